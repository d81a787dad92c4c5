"""Every typed dependency slot of the aiohttp application."""

from __future__ import annotations

import random
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.config.runtime import Runtime
from gateway.jwtauth import JwtVerifier
from gateway.limits.base import Limiter
from gateway.sinks import Sink
from gateway.telemetry import Telemetry


@dataclass(slots=True)
class JwtHolder:
    """The JWT verifier in use; a reload with new `auth.jwt` settings replaces `current` once
    the new verifier has its keys."""

    current: JwtVerifier | None


@dataclass(slots=True)
class RuntimeHolder:
    """The current runtime. A reload replaces `current` in one assignment; each request reads
    it once and keeps that snapshot."""

    current: Runtime


RUNTIME = web.AppKey("runtime", RuntimeHolder)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
# Per-caller limits (memory or Redis); outlives config reloads.
LIMITER = web.AppKey("limiter", Limiter)
# JWT verification (`current` is None when auth.jwt is not configured); a reload swaps it.
JWT = web.AppKey("jwt", JwtHolder)
TELEMETRY = web.AppKey("telemetry", Telemetry)
# Jitter for retry backoff (an app-level instance: tests can seed it).
RANDOM = web.AppKey("random", random.Random)
# Called with every finished request's Report and the perf_counter time it ended (access log,
# metrics, tests). A sink must be cheap; one that raises is logged and skipped.
OUTCOME_SINKS = web.AppKey("outcome_sinks", list[Sink])
