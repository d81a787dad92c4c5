"""Where a finished request goes: the access log, the metrics, the server span. Each sink
reads the `Report` once, at the end; `finish` calls every sink under a guard, so a failing
one cannot skip the others (nor what the handler does after them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.trace import Span

from gateway.limits.budget import NANO
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.report import Outcome, Report
from gateway.telemetry import attrs, set_error

_log = get_logger("gateway.access")
_sink_log = get_logger("gateway")

Sink = Callable[[Report, float], None]


def finish(report: Report, now: float, sinks: Sequence[Sink]) -> None:
    """End the server span and hand `report` to every sink; never raises."""
    for sink in (finish_server_span, *sinks):
        try:
            sink(report, now)
        except Exception:  # a sink's bug must not cost the others (or the caller's answer)
            _sink_log.exception("sink failed", sink=getattr(sink, "__name__", repr(sink)))


def finish_server_span(report: Report, now: float) -> None:
    span = report.span
    if span.is_recording():
        span.set_attributes(_server_attributes(report))
        if _is_span_error(report):
            set_error(span, report.outcome)
    span.end()


def _is_span_error(r: Report) -> bool:
    if r.label in (Outcome.OK, Outcome.CLIENT_CANCEL):
        return False
    named = Outcome.named(r.outcome)
    return r.status is None or r.status >= 500 or (named is not None and named.broke_stream)


def _server_attributes(r: Report) -> dict[str, Any]:
    t = r.timings
    values: dict[str, Any] = attrs(
        http__response__status_code=r.status,
        gateway__outcome=r.outcome,
        gateway__attempts=r.attempts,
        gateway__deployment=r.deployment,
        gateway__key_id=r.key_id,
        gateway__overhead_ms=r.overhead_ms,
    )
    # Where the client's time to first byte went.
    if t.admitted is not None:
        values["gateway.ttft.admission_ms"] = (t.admitted - r.started) * 1000
        if t.attempt_started is not None:
            values["gateway.ttft.retries_ms"] = (t.attempt_started - t.admitted) * 1000
    if t.attempt_started is not None and t.first_upstream_byte is not None:
        values["gateway.ttft.upstream_connect_ms"] = t.connect_s * 1000
        values["gateway.ttft.upstream_ttfb_ms"] = (
            t.first_upstream_byte - t.attempt_started - t.connect_s
        ) * 1000
    if t.first_upstream_byte is not None and t.first_byte_sent is not None:
        values["gateway.ttft.relay_ms"] = (t.first_byte_sent - t.first_upstream_byte) * 1000
    facts = r.facts
    if facts is not None and facts.first_token_at is not None:
        values["gen_ai.response.time_to_first_chunk"] = facts.first_token_at - r.started
    return values


def finish_attempt_span(span: Span, report: Report, failure_reason: str | None) -> None:
    """End an attempt's CLIENT span: with the failure's reason, or with what the answer was."""
    if not span.is_recording():
        span.end()
        return
    if failure_reason is not None:
        span.set_attribute("gateway.attempt.outcome", failure_reason)
        set_error(span, failure_reason)
        span.end()
        return
    facts = report.facts
    usage = report.final_usage
    span.set_attributes(
        attrs(
            gateway__attempt__outcome=report.outcome,
            gen_ai__response__id=facts.response_id if facts else None,
            gen_ai__response__model=facts.response_model if facts else None,
            gen_ai__usage__input_tokens=usage.input_tokens if usage else None,
            gen_ai__usage__output_tokens=usage.output_tokens if usage else None,
            gen_ai__usage__cache_read__input_tokens=(
                usage.cache_read_input_tokens if usage else None
            ),
            gateway__events=facts.events if facts else None,
        )
    )
    if facts is not None and facts.finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [facts.finish_reason])
    if report.outcome != Outcome.OK.value:
        set_error(span, report.outcome)
    span.end()


def access_log(r: Report, now: float) -> None:
    """The sink that writes one JSON access line per request."""
    fields: dict[str, Any] = {
        "request_id": r.request_id,
        "caller": r.caller,
        "model": r.model,
        "deployment": r.deployment,
        "key_id": r.key_id,
        "key_fp": r.key_fp,
        "status": r.status,
        "outcome": r.outcome,
        "stream": r.stream,
        "upstream_status": r.upstream_status,
        "attempts": r.attempts,
        "duration_ms": round((now - r.started) * 1000, 3),
    }
    optional = {
        "upstream_request_id": r.upstream_request_id,
        "trace_id": r.trace_id,
        "span_id": r.span_id if r.trace_id is not None else None,
        "overhead_ms": round(r.overhead_ms, 3) if r.overhead_ms is not None else None,
        "retry_reasons": r.retry_reasons or None,
        "limiter": r.limiter,
        "reconciled_tokens": r.reconciled,
        "queued_ms": round(r.queued_s * 1000, 3) if r.queued_s else None,
        "hedged": True if r.hedged else None,
        "hedge_won": r.hedge_won,
        "budget_tokens": r.budget_tokens,
        "budget_cost": round(r.budget_cost / NANO, 9) if r.budget_cost is not None else None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    if r.usage is not None:
        fields["input_tokens"] = r.usage.input_tokens
        fields["output_tokens"] = r.usage.output_tokens
    if r.timings.first_upstream_byte is not None:
        fields["ttfb_ms"] = round((r.timings.first_upstream_byte - r.started) * 1000, 3)
    if r.facts is not None:
        fields.update(_stream_fields(r))
    _log.info("request", **fields)


def _stream_fields(r: Report) -> dict[str, Any]:
    facts = r.facts
    assert facts is not None
    fields: dict[str, Any] = {"events": facts.events, "bytes_out": r.bytes_out}
    if r.stream_id is not None:
        fields["stream_id"] = r.stream_id
    if r.drained:
        fields["drained"] = True
        fields["drain_outcome"] = r.drain_end
    if facts.first_token_at is not None:
        fields["ttft_ms"] = round((facts.first_token_at - r.started) * 1000, 3)
    fields["finish_reason"] = facts.finish_reason
    if facts.usage is not None:
        fields["input_tokens"] = facts.usage.input_tokens
        fields["output_tokens"] = facts.usage.output_tokens
    if facts.error_type is not None:
        fields["upstream_error_type"] = facts.error_type
    return fields


def metrics_sink(metrics: Metrics) -> Sink:
    """The sink that feeds /metrics (once per request, never per chunk)."""

    def record_metrics(r: Report, now: float) -> None:
        record(metrics, r, now)

    return record_metrics


def record(metrics: Metrics, r: Report, now: float) -> None:
    """Model labels are configured names only (`unknown` for the rest): callers cannot add
    series."""
    model = r.model_label
    label = r.label
    metrics.child(metrics.requests, model, label.value).inc()
    if r.attempts == 0 and r.deployment is None:
        return  # answered by the gateway alone: no GenAI operation happened
    provider, deployment, op = r.api, r.deployment or "", r.operation
    error_type = "" if label in (Outcome.OK, Outcome.CLIENT_CANCEL) else r.outcome
    metrics.child(metrics.operation_duration, op, provider, model, deployment, error_type).observe(
        now - r.started
    )
    if r.overhead_ms is not None:
        metrics.child(metrics.overhead, model).observe(r.overhead_ms / 1000)
    usage = r.final_usage
    if usage is not None:
        for kind, tokens in (("input", usage.input_tokens), ("output", usage.output_tokens)):
            if tokens is not None:
                metrics.child(metrics.token_usage, op, provider, model, kind).observe(tokens)
    facts = r.facts
    if facts is None or facts.first_token_at is None:
        return
    metrics.child(metrics.time_to_first_chunk, op, provider, model, deployment).observe(
        facts.first_token_at - r.started
    )
    last = facts.last_event_at
    chunks = facts.events - (facts.first_token_event or 0) - 1
    if last is not None and chunks > 0:
        metrics.child(metrics.time_per_output_chunk, op, provider, model, deployment).observe(
            (last - facts.first_token_at) / chunks
        )
