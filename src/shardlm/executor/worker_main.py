"""Entry point of a rank the driver spawned: ``python -m shardlm.executor.worker_main``,
given the resolved configuration as JSON. Kept apart from executor/ranks.py (which the CLI
imports for torchrun ranks), so running it as ``__main__`` never imports a module twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist

from shardlm.engine_config import EngineConfig
from shardlm.executor.launch import init_groups, start_heartbeat
from shardlm.executor.ranks import serve

logger = logging.getLogger("shardlm.executor.worker")


def spawned_worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker the driver started."""
    parser = argparse.ArgumentParser(description="shardlm worker rank (internal)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--config", required=True, help="the resolved EngineConfig as JSON")
    ns = parser.parse_args(argv)
    config = EngineConfig.from_json(ns.config)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {ns.rank}] %(levelname)s %(message)s")
    os.environ["SHARDLM_LOCAL_RANK"] = str(ns.rank)
    try:
        start_heartbeat(ns.rank, "127.0.0.1", ns.port, ns.parent)
        store = dist.TCPStore("127.0.0.1", ns.port, is_master=False)
        serve(init_groups(ns.rank, config, store), config)
    except KeyboardInterrupt:
        return 130
    except Exception:
        logger.exception("rank %d (%s) failed", ns.rank, config.parallel.role_of(ns.rank))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(spawned_worker_main())
