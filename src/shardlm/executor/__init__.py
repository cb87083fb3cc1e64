"""Running a job: launching ranks, their command loops and start-up, and the driver's
handle on them (Executor)."""
