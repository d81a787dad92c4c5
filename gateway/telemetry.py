"""Traces (OpenTelemetry) for on-call: one SERVER span per request, children for auth, limit
admission and each upstream attempt (a CLIENT span named `{operation} {model}` with the GenAI
attributes), live events at the first upstream byte and the first token, and the split of the
client's time to first token into its parts.

Tracing costs nothing per chunk: the relay only tells the attempt span when the first token
arrived. Without an OTLP endpoint (and without a provider injected by tests) the tracer is a
no-op. Only W3C tracecontext is propagated upstream (never baggage), and no prompt or
completion text is recorded unless `telemetry.capture_content` is on.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import __version__
from gateway.config.schema import TelemetryConfig
from gateway.metrics import Metrics

_PROPAGATOR = TraceContextTextMapPropagator()


class Telemetry:
    """Tracer, propagator and metrics of one app."""

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        tracer_provider: TracerProvider | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.capture_content = config.capture_content
        self.metrics = metrics or Metrics()
        self._owned: TracerProvider | None = None
        if tracer_provider is None and config.otlp_endpoint:
            tracer_provider = self._otlp_provider(config)
            self._owned = tracer_provider
        self.tracer: Tracer = (
            tracer_provider.get_tracer("llm-gateway", __version__)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        self.enabled = tracer_provider is not None

    @staticmethod
    def _otlp_provider(config: TelemetryConfig) -> TracerProvider:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
            ParentBased,
            TraceIdRatioBased,
        )

        endpoint = config.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return provider

    def shutdown(self) -> None:
        if self._owned is not None:
            self._owned.shutdown()

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The caller's trace context (`traceparent`), if any."""
        return _PROPAGATOR.extract(headers)

    def inject(self, span: Span, headers: MutableMapping[str, str]) -> None:
        """`traceparent` for the upstream request (tracecontext only: no baggage leaves)."""
        if self.enabled:
            _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))

    def server_span(self, name: str, headers: Mapping[str, str]) -> Span:
        return self.tracer.start_span(name, context=self.extract(headers), kind=SpanKind.SERVER)

    def child(self, parent: Span, name: str, kind: SpanKind = SpanKind.INTERNAL) -> Span:
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent), kind=kind)


def set_error(span: Span, error_type: str, message: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message))


def attrs(**values: Any) -> dict[str, Any]:
    """Span attributes without the None values (OTel rejects None)."""
    return {k.replace("__", "."): v for k, v in values.items() if v is not None}


def ids(span: Span) -> tuple[str | None, str | None]:
    """(trace_id, span_id) as hex, for log lines; None when not recording."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
