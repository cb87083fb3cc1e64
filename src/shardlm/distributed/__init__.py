"""Process groups, roles and launch for tensor parallelism (all over torch.distributed)."""
