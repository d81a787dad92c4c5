"""What one request reports when it ends, and the one outcome vocabulary.

Each stage of the request path writes its own part of the `Report` through one method
(`authenticated`, `parsed`, `admitted`, `attempting`, `answered`, `streamed`, ...); the sinks
(access log, metrics, spans) only read it, once the request is over. `Outcome` is the bounded
vocabulary that logs, metrics, span status and the alert rules share.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry.trace import INVALID_SPAN, Span

from gateway.providers.base import StreamFacts, Usage

if TYPE_CHECKING:
    from gateway.config.runtime import Deployment
    from gateway.keypool import UpstreamKey


def new_request_id() -> str:
    """The gateway's id of a request (`req_` + 24 hex), sent to callers and logged."""
    return "req_" + secrets.token_hex(12)


class Outcome(enum.Enum):
    """How a request ended, as a bounded label (`llm_gateway_requests_total{outcome}`).

    The first seven are also the ways a relayed stream ends."""

    OK = "ok"  # the stream's end marker (or a finish reason) was seen / a whole answer
    CLIENT_CANCEL = "client_cancel"  # the client went away
    CHUNK_TIMEOUT = "chunk_timeout"  # upstream silence between chunks exceeded chunk_s
    TOTAL_TIMEOUT = "total_timeout"  # the request exceeded total_s
    TRUNCATED = "truncated"  # the body ended without an end marker or a finish reason
    PAYLOAD_ERROR = "payload_error"  # the upstream connection broke mid-body
    UPSTREAM_ERROR = "upstream_error"  # an in-band error event, or an upstream failure
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    RATE_LIMITED = "rate_limited"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    INVALID_REQUEST = "invalid_request"
    INTERNAL_ERROR = "internal_error"
    OPERATOR_CANCEL = "operator_cancel"  # ended from the admin listener
    BUDGET_EXCEEDED = "budget_exceeded"  # refused, or a stream cut, for a spent budget

    @property
    def is_error(self) -> bool:
        """Counts toward the error-rate alert (the caller's own faults do not)."""
        return self in _ERRORS

    @property
    def broke_stream(self) -> bool:
        """A stream that started but did not end as it should (an error on its span)."""
        return self in _BROKEN_STREAMS

    @classmethod
    def named(cls, reason: str) -> Outcome | None:
        """The member whose value `reason` is, if any (stream ends are named by their label)."""
        return _BY_VALUE.get(reason)

    @classmethod
    def of(cls, reason: str, status: int | None) -> Outcome:
        """The label of a detailed reason (the access log's `outcome`): a stream end or a
        known reason by name, anything else by its HTTP status."""
        known = _BY_REASON.get(reason)
        if known is not None:
            return known
        code = status or 0
        if code == 429:
            return cls.RATE_LIMITED
        if code == 503:
            return cls.UPSTREAM_UNAVAILABLE
        if 400 <= code < 500:
            return cls.INVALID_REQUEST
        return cls.UPSTREAM_ERROR


_BROKEN_STREAMS = frozenset(
    {
        Outcome.CHUNK_TIMEOUT,
        Outcome.TOTAL_TIMEOUT,
        Outcome.TRUNCATED,
        Outcome.PAYLOAD_ERROR,
        Outcome.UPSTREAM_ERROR,
    }
)
_ERRORS = _BROKEN_STREAMS | {Outcome.UPSTREAM_UNAVAILABLE, Outcome.INTERNAL_ERROR}
_BY_VALUE: dict[str, Outcome] = {o.value: o for o in Outcome}
_BY_REASON: dict[str, Outcome] = {
    **{
        o.value: o
        for o in _BROKEN_STREAMS
        | {Outcome.OK, Outcome.CLIENT_CANCEL, Outcome.OPERATOR_CANCEL, Outcome.BUDGET_EXCEEDED}
    },
    "authentication": Outcome.AUTH_FAILED,
    "permission": Outcome.FORBIDDEN,
    "rate_limited": Outcome.RATE_LIMITED,
    "internal": Outcome.INTERNAL_ERROR,
    "upstream_unavailable": Outcome.UPSTREAM_UNAVAILABLE,
    "limiter_unavailable": Outcome.UPSTREAM_UNAVAILABLE,
}


@dataclass(slots=True)
class Timings:
    """`time.perf_counter()` marks of one request, filled in as it happens (the TTFT split)."""

    admitted: float | None = None  # auth + parse + route + limits done
    attempt_started: float | None = None  # the attempt that served the answer
    connect_s: float = 0.0  # TCP/TLS connect of that attempt (0 on a reused connection)
    first_upstream_byte: float | None = None
    first_byte_sent: float | None = None  # response headers + first bytes to the client


@dataclass(slots=True)
class Report:
    """One request, as the access log, the metrics and the spans tell it."""

    started: float  # perf_counter: every figure a user reads is measured on this clock
    started_loop: float  # the loop clock at the same moment: deadlines and timers
    request_id: str  # the gateway's own id of this request
    operation: str  # GenAI operation name
    api: str  # gen_ai.provider.name of the wire API (openai | anthropic)
    span: Span = field(default=INVALID_SPAN)
    trace_id: str | None = None
    span_id: str | None = None
    # auth
    caller: str | None = None
    # edge
    model: str | None = None  # as the caller sent it
    model_label: str = "unknown"  # the configured model name, for metric labels
    stream: bool = False
    estimate: int = 0  # the request's token estimate (reservations)
    # admission
    limiter: str | None = None  # ok | degraded | denied_<limit> | degraded_denied_<limit>
    reconciled: int | None = None  # tokens charged (+) or refunded (-) after the fact
    budget_tokens: int | None = None  # charged to the caller's spend budgets
    budget_cost: int | None = None  # nano-units charged to its cost budgets
    extra_headers: dict[str, str] = field(default_factory=dict)  # RateLimit headers
    # attempts
    attempts: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    deployment: str | None = None  # provider/model of the last attempt
    provider: str | None = None  # the provider of the last attempt (names may hold a "/")
    key_id: str | None = None
    key_fp: str | None = None
    attempt_span: Span = field(default=INVALID_SPAN)
    upstream_status: int | None = None
    upstream_request_id: str | None = None
    # the answer
    status: int | None = None
    outcome: str = "ok"  # the detailed reason (`Outcome.of` gives its label)
    bytes_out: int = 0
    usage: Usage | None = None  # of a non-stream answer (streams: facts.usage)
    facts: StreamFacts | None = None  # of a relayed stream
    overhead_ms: float | None = None
    ended: bool = False  # a committed stream reached its end (whatever the outcome)
    stream_id: str | None = None  # x-gateway-stream-id of a committed stream
    queued_s: float = 0.0  # waited in the capacity queue (policy.queue)
    hedged: bool = False  # a parallel attempt was started (policy.hedge)
    hedge_won: str | None = None  # first | hedge
    drained: bool = False  # resumable: the client left and the upstream was read to its end
    drain_end: str | None = None  # how the drained upstream ended (an Outcome value)
    timings: Timings = field(default_factory=Timings)

    # -- written by the stages ---------------------------------------------------------------

    def parsed(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream

    def routed(self, route_name: str, estimate: int) -> None:
        self.model_label = route_name
        self.estimate = estimate

    def attempting(self, deployment: Deployment, key: UpstreamKey, span: Span) -> None:
        """A new upstream attempt starts (the last one is what the answer reports)."""
        self.attempts += 1
        self.provider = deployment.provider.name
        self.deployment = f"{deployment.provider.name}/{deployment.model}"
        self.key_id = key.id
        self.key_fp = key.fingerprint
        self.attempt_span = span

    def upstream_answered(self, status: int, request_id: str | None) -> None:
        self.upstream_status = status
        self.upstream_request_id = request_id

    def answered(self, status: int, reason: str) -> None:
        """The caller got a whole answer (or an error) with `status`; `reason` is ok or why."""
        self.status = status
        self.outcome = reason

    def streaming(self, status: int, facts: StreamFacts) -> None:
        """A stream was committed to the client with `status`."""
        self.status = status
        self.facts = facts

    def streamed(self, end: Outcome) -> None:
        """The committed stream ended (`bytes_out` counts what it sent)."""
        self.outcome = end.value
        self.ended = True

    def cancelled(self) -> None:
        """The client went away: the outcome, unless its stream had already ended (a client
        that leaves once it has everything, while the gateway settles, was served)."""
        if not self.ended:
            self.outcome = Outcome.CLIENT_CANCEL.value

    # -- read by the sinks and admission -----------------------------------------------------

    @property
    def label(self) -> Outcome:
        return Outcome.of(self.outcome, self.status)

    @property
    def final_usage(self) -> Usage | None:
        return self.facts.usage if self.facts is not None else self.usage

    @property
    def used_tokens(self) -> int | None:
        """Tokens the answer reports (input + output), None when it reports none."""
        usage = self.final_usage
        if usage is None or (usage.input_tokens is None and usage.output_tokens is None):
            return None
        return (usage.input_tokens or 0) + (usage.output_tokens or 0)
