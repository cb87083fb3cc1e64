"""Entry point of a worker process the driver spawned: ``python -m
shardlm.distributed.worker_main``. Kept apart from worker.py, which the package imports, so
running it as ``__main__`` never imports the module twice."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch.distributed as dist

from shardlm.distributed.launch import WorkerArgs, init_groups, start_heartbeat
from shardlm.distributed.worker import serve

logger = logging.getLogger("shardlm.distributed.worker")


def spawned_worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker the driver started (``python -m shardlm.distributed.worker``)."""
    parser = argparse.ArgumentParser(description="shardlm tensor-parallel worker (internal)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--args", required=True, help="WorkerArgs as JSON")
    ns = parser.parse_args(argv)
    args = WorkerArgs(**json.loads(ns.args))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {ns.rank}] %(levelname)s %(message)s")
    os.environ["SHARDLM_LOCAL_RANK"] = str(ns.rank)
    try:
        start_heartbeat(ns.rank, "127.0.0.1", ns.port, ns.parent)
        store = dist.TCPStore("127.0.0.1", ns.port, is_master=False)
        tp = init_groups(ns.rank, args, store)
        serve(tp, args)
    except KeyboardInterrupt:
        return 130
    except Exception:
        logger.exception("tensor-parallel rank %d failed", ns.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(spawned_worker_main())
