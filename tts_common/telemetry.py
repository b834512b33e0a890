"""OpenTelemetry for the services and the client: tracing across processes and hand-made metrics.

One ``Telemetry`` per process (tests build one per in-process server, each with its own providers and
in-memory exporters). Trace context crosses gRPC calls in the metadata (W3C ``traceparent``):
``outgoing_metadata()`` on the calling side, ``context_from_metadata()`` in the handler. We propagate
by hand instead of using the grpc instrumentation's aio server interceptor: that keeps providers per
server, and the grpc instrumentation records no metrics anyway.

Export: ``Telemetry.from_env()`` turns on OTLP (traces and metrics) when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`` variables are set
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_*_EXPORTER=none`` and
``OTEL_SDK_DISABLED`` are honoured); with none of them set telemetry costs nothing (no-op providers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


class Telemetry:
    """The tracer and meter of one service.

    ``tracer_provider`` / ``meter_provider`` default to no-op providers (nothing recorded).
    """

    def __init__(
        self,
        service_name: str,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ):
        self.service_name = service_name
        self.tracer_provider = tracer_provider or trace.NoOpTracerProvider()
        self.meter_provider = meter_provider or metrics.NoOpMeterProvider()
        self.tracer = self.tracer_provider.get_tracer(f"chatterbox.{service_name}")
        self.meter = self.meter_provider.get_meter(f"chatterbox.{service_name}")

    @classmethod
    def from_env(cls, service_name: str, environ: Mapping[str, str] | None = None) -> Telemetry:
        """OTLP export when the standard ``OTEL_*`` variables ask for it, else no-op."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls(service_name)
        any_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        want_traces = (any_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) and env.get(
            "OTEL_TRACES_EXPORTER", "otlp"
        ) != "none"
        want_metrics = (any_endpoint or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")) and env.get(
            "OTEL_METRICS_EXPORTER", "otlp"
        ) != "none"
        if not (want_traces or want_metrics):
            return cls(service_name)

        from opentelemetry.sdk.resources import OTEL_SERVICE_NAME, Resource

        attrs = {} if env.get(OTEL_SERVICE_NAME) else {"service.name": service_name}
        resource = Resource.create(attrs)  # merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME
        tracer_provider = meter_provider = None
        if want_traces:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if want_metrics:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            meter_provider = MeterProvider(
                resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
            )
        log.info("OpenTelemetry OTLP export on", extra={"traces": bool(want_traces), "metrics": bool(want_metrics)})
        return cls(service_name, tracer_provider, meter_provider)

    def shutdown(self) -> None:
        """Flush and stop the SDK providers (no-op providers have nothing to flush)."""
        for provider in (self.tracer_provider, self.meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # exporter down at exit: nothing useful to do
                    log.warning("telemetry shutdown failed", exc_info=True)

    def gauge(self, name: str, read: Callable[[], float], description: str, unit: str = "1") -> None:
        """An observable gauge whose value is ``read()`` at each collection."""

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(read())]
            except Exception:  # a gauge must never break collection
                return []

        self.meter.create_observable_gauge(name, callbacks=[callback], description=description, unit=unit)


def outgoing_metadata(extra: Sequence[tuple[str, str]] = (), ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the current (or given) trace context, plus ``extra`` pairs."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return list(extra) + sorted(carrier.items())


class _MetadataGetter(DefaultGetter):
    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        return None if value is None else [value]


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata (an empty context if none came)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier, getter=_MetadataGetter())


def trace_id_hex(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits (empty for a non-recording/no-op span)."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
