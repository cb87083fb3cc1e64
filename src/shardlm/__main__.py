"""``python -m shardlm`` is the ``shardlm`` command (torchrun launches it this way)."""

from shardlm.entrypoints.cli import main

raise SystemExit(main())
