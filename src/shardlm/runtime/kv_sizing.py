"""How many tokens a KV pool gets: exactly what was asked, or what free memory allows.

Every rank of a job proposes a size for the pools it holds (compute ranks their paged pool,
or with attention nodes each node its own); the ranks then agree on the smallest proposal
(an AllReduce MIN at start-up, executor/startup.py) so every pool of the job has the same
number of blocks. Ranks that hold no pool propose nothing.
"""

from __future__ import annotations

import os

import torch

from shardlm.engine_config import DEFAULT_MEMORY_UTILIZATION


def propose_kv_tokens(
    per_token: int,
    device: torch.device,
    kv_cache_tokens: int | None,
    memory_utilization: float | None,
    pools_on_host: int,
    max_useful_tokens: int,
) -> tuple[int, str]:
    """(tokens for one pool, how that was decided). ``pools_on_host``: pools sharing this
    device's memory (CPU ranks on one host share its RAM); ``max_useful_tokens``: more than
    every sequence at full length can never be used."""
    if kv_cache_tokens is not None:
        return kv_cache_tokens, "kv_cache_tokens"
    util = memory_utilization or DEFAULT_MEMORY_UTILIZATION[device.type]
    budget = memory_budget(device, util) // max(1, pools_on_host)
    how = f"memory_utilization={util} of free memory ({budget / 2**30:.2f} GiB per pool)"
    return min(budget // per_token, max_useful_tokens), how


def pools_sharing_memory(
    device: torch.device, pools_in_job: int, pools_in_process: int, world_size: int
) -> int:
    """KV pools drawing on the same memory as this one: a GPU's pools are those of its
    process; host RAM is shared by every pool on the host (spawned ranks all run here; under
    torchrun, LOCAL_WORLD_SIZE of the WORLD_SIZE ranks do)."""
    if device.type == "cuda":
        return pools_in_process
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, pools_in_job * local // world_size)


def memory_budget(device: torch.device, utilization: float) -> int:
    """Bytes the KV pool may take: ``utilization`` of what is free now (after the weights)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * utilization) - (total - free))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(available * utilization)
