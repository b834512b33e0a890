"""Telemetry: OTLP only when OTEL_* asks for it; trace context through gRPC metadata."""

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tts_common.telemetry import Telemetry, context_from_metadata, outgoing_metadata


def test_off_unless_configured():
    assert isinstance(Telemetry.from_env("x", {}).tracer_provider, trace.NoOpTracerProvider)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}
    assert isinstance(Telemetry.from_env("x", env).tracer_provider, trace.NoOpTracerProvider)
    on = Telemetry.from_env("x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_METRICS_EXPORTER": "none"})
    try:
        assert isinstance(on.tracer_provider, TracerProvider)
        assert on.tracer_provider.resource.attributes["service.name"] == "x"
    finally:
        on.shutdown()


def test_context_roundtrip_through_metadata():
    tel = Telemetry("x", TracerProvider())
    with tel.tracer.start_as_current_span("parent") as span:
        md = outgoing_metadata([("k", "v")])
    assert ("k", "v") in md and any(k == "traceparent" for k, _ in md)
    ctx = context_from_metadata(md)
    assert trace.get_current_span(ctx).get_span_context().trace_id == span.get_span_context().trace_id
    assert not trace.get_current_span(context_from_metadata([])).get_span_context().is_valid
