"""OpenTelemetry: a tracer for the router. Spans go to an OTLP endpoint when the config names one;
tests pass their own exporter (an in-memory one)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter


def make_tracer(otlp_endpoint: str | None = None, exporter: SpanExporter | None = None) -> trace.Tracer:
    provider = TracerProvider(resource=Resource.create({"service.name": "precision-serving-router"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider.get_tracer("serving.route.core")


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")
