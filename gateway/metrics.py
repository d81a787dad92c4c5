"""Prometheus metrics (`GET /metrics`): the GenAI semantic-convention histograms plus what
on-call needs about the gateway itself.

Every label is bounded: configured model and provider names, deployment, key id, outcome,
reason, limit; never caller-controlled free text. One `Metrics` per app, on its own registry
(tests build as many apps as they like).
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway.report import Outcome

# GenAI semantic conventions: seconds buckets and token buckets.
SECONDS_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
# The gateway's own overhead is sub-millisecond: finer buckets.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")

# Outcomes that count as errors for the error-rate alert (the caller's own faults do not):
# the one vocabulary, gateway.report.Outcome (deploy/prometheus/alerts.yml is checked against it).
ERROR_OUTCOMES = tuple(o.value for o in Outcome if o.is_error)


_Family = TypeVar("_Family", Counter, Gauge, Histogram)


class Metrics:
    """The metric families. Methods are cheap; nothing here runs per chunk."""

    def __init__(self) -> None:
        # Children by (family, label values): prometheus_client's labels() takes a lock and
        # converts every value on each call, and a request asks for several (labels are
        # bounded, so this is too).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: request received to the last byte sent.",
            (*_GENAI, "deployment", "error_type"),
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.time_to_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from the request to the first chunk with generated content (streams).",
            (*_GENAI, "deployment"),
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.time_per_output_chunk = Histogram(
            "gen_ai_client_operation_time_per_output_chunk_seconds",
            "Mean time between output chunks after the first, per stream.",
            (*_GENAI, "deployment"),
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per operation, by gen_ai_token_type (input | output).",
            (*_GENAI, "gen_ai_token_type"),
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_gateway_overhead_seconds",
            "Time spent in the gateway up to the first byte sent, upstream time excluded.",
            ("gen_ai_request_model",),
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "llm_gateway_active_streams",
            "Streams being relayed to clients now.",
            ("gen_ai_request_model",),
            registry=r,
        )
        self.requests = Counter(
            "llm_gateway_requests",
            "Requests by outcome (ok, client_cancel, chunk_timeout, upstream_error, "
            "rate_limited, auth_failed, ...).",
            ("gen_ai_request_model", "outcome"),
            registry=r,
        )
        self.retries = Counter(
            "llm_gateway_retries",
            "Upstream attempts that failed before the first byte and were followed by another.",
            ("gen_ai_provider_name", "reason"),
            registry=r,
        )
        self.key_state = Gauge(
            "llm_gateway_upstream_key_state",
            "1 for the current state (ok | cooldown | disabled) of each upstream key.",
            ("gen_ai_provider_name", "key_id", "state"),
            registry=r,
        )
        self.key_in_flight = Gauge(
            "llm_gateway_upstream_key_in_flight",
            "Requests in flight per upstream key.",
            ("gen_ai_provider_name", "key_id"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "llm_gateway_queue_depth",
            "Requests waiting in the capacity queue for an upstream key (policy.queue).",
            ("gen_ai_provider_name",),
            registry=r,
        )
        self.queue_wait = Histogram(
            "llm_gateway_queue_wait_seconds",
            "Time a request waited in the capacity queue.",
            ("gen_ai_provider_name",),
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.hedges = Counter(
            "llm_gateway_hedges",
            "Requests that started a hedged attempt, by outcome (first_won | hedge_won | "
            "all_failed).",
            ("outcome",),
            registry=r,
        )
        self.stream_resumes = Counter(
            "llm_gateway_stream_resumes",
            "Reattaches to resumable streams by result (ok | not_found | gone | range).",
            ("result",),
            registry=r,
        )
        self.budget_exceeded = Counter(
            "llm_gateway_budget_exceeded",
            "Spent budgets by tier and where they stopped a request: admission (a 429 "
            "budget_exceeded) or stream (a stream cut mid-way with a budget_exceeded event).",
            ("tier", "at"),
            registry=r,
        )
        self.limiter_decisions = Counter(
            "llm_gateway_limiter_decisions",
            "Limit decisions by backend (memory | redis | fallback = taken without Redis), "
            "decision (allowed | denied) and the limit that denied (rpm | tpm | concurrency).",
            ("backend", "decision", "limit"),
            registry=r,
        )

    def child(self, family: _Family, *values: str) -> _Family:
        """`family.labels(*values)`, remembered."""
        key = (id(family), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
