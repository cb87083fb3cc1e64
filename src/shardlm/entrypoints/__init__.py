"""User-facing entry points: the ``shardlm`` command line."""
