"""KV-cache storage."""
