"""Whether this process is a rank of a torchrun job, and which (its environment says so)."""

from __future__ import annotations

import os


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def torchrun_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE)."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
