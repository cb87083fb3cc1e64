"""``python -m shardlm`` is the ``shardlm`` command (torchrun launches it this way).

Guarded: ``shardlm serve`` starts its engine process with multiprocessing's spawn, which
imports this module again in the child (as ``__mp_main__``), where it must do nothing.
"""

from shardlm.entrypoints.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
