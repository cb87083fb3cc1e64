"""One rank's model execution: the ModelRunner, CUDA-graph decode steps, KV pool sizing."""
