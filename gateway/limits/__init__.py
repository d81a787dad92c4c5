"""Per-caller limits: requests and tokens per minute (GCRA), concurrent streams and concurrent
requests (slots held under one lease).

`Limiter` is the seam; `memory.MemoryLimiter` (one process) and `redis.RedisLimiter` (shared by
every instance) implement it and pass one contract test suite. The GCRA maths is pure
(`gcra.py`), and the Redis Lua script implements the same maths server-side.
"""

from __future__ import annotations

from gateway.limits.base import Decision, Lease, Limiter, LimiterUnavailable, LimitSpec

__all__ = ["Decision", "Lease", "LimitSpec", "Limiter", "LimiterUnavailable"]
