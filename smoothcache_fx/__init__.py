"""smoothcache_fx."""
