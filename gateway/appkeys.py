"""Every typed dependency slot of the aiohttp application."""

from __future__ import annotations

import random
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.attempts import HedgeStats
from gateway.budget import BudgetTallies
from gateway.config.runtime import Runtime
from gateway.limits.base import Limiter
from gateway.ops import Ops
from gateway.queue import CapacityQueue
from gateway.resume.readers import Readers
from gateway.resume.store import ReplayStore
from gateway.sinks import Sink
from gateway.telemetry import Telemetry


@dataclass(slots=True)
class RuntimeHolder:
    """The current runtime (its JWT verifier included). A reload replaces `current` in one
    assignment; each request reads it once and keeps that snapshot."""

    current: Runtime


RUNTIME = web.AppKey("runtime", RuntimeHolder)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
# Per-caller limits (memory or Redis); outlives config reloads.
LIMITER = web.AppKey("limiter", Limiter)
TELEMETRY = web.AppKey("telemetry", Telemetry)
# Jitter for retry backoff (an app-level instance: tests can seed it).
RANDOM = web.AppKey("random", random.Random)
# Called with every finished request's Report and the perf_counter time it ended (access log,
# metrics, tests). A sink must be cheap; one that raises is logged and skipped.
OUTCOME_SINKS = web.AppKey("outcome_sinks", list[Sink])
# Open streams, the per-model window, the config's state, draining (the admin listener reads it).
OPS = web.AppKey("ops", Ops)
# Where resumable streams' bytes are kept (built once per process from `resume.store`).
RESUME_STORE = web.AppKey("resume_store", ReplayStore)
# Reattaches open now (bounded per stream and per caller).
RESUME_READERS = web.AppKey("resume_readers", Readers)
# Requests waiting for shared upstream capacity (policy.queue); one per process.
QUEUE = web.AppKey("queue", CapacityQueue)
# The routes' observed time to a first event (policy.hedge.after_ms: p95).
HEDGES = web.AppKey("hedges", HedgeStats)
# Each caller's metered streams on this instance (spend budgets).
BUDGETS = web.AppKey("budgets", BudgetTallies)
