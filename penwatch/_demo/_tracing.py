"""OpenTelemetry SDK set-up for the CLI (the library itself only uses the API).

OTLP/HTTP is configured only when the standard variables ask for it
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_TRACES_EXPORTER``); the exporter reads the ``OTEL_EXPORTER_OTLP_*`` variables
(endpoint, headers, timeout, compression) itself. ``service.name`` defaults to
``penwatch`` unless ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` set it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

__all__ = [
    "SHUTDOWN_TIMEOUT",
    "CountingExporter",
    "configure_tracing",
    "shutdown_tracing",
    "tracing_requested",
]

SHUTDOWN_TIMEOUT = 2.0
"""Seconds :func:`shutdown_tracing` waits for the last export (SPEC section 11)."""

logger = logging.getLogger("penwatch.demo")

_REQUEST_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
)


class CountingExporter(SpanExporter):
    """Wraps an exporter and counts exported and failed spans (lost spans are visible).

    The first failed export is logged (the exporter's own retries have given up by
    then); later ones are counted only.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.exported = 0
        self.failed = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:  # an exporter bug must not kill the batch processor
            logger.exception("span exporter raised")
            result = SpanExportResult.FAILURE
        with self._lock:
            if result == SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                if not self.failed:
                    logger.warning(
                        "could not export %d spans (is the OTLP collector up?); counting "
                        "lost spans from now on",
                        len(spans),
                    )
                self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for trace export (and not ``none``)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name) for name in _REQUEST_VARS)


def configure_tracing(
    *, service_name: str = "penwatch", exporter: SpanExporter | None = None
) -> tuple[TracerProvider, CountingExporter] | None:
    """An SDK ``TracerProvider`` exporting in batches, or None when nobody asked.

    Args:
      service_name: ``service.name`` unless the environment sets one.
      exporter: export to this instead of what ``OTEL_TRACES_EXPORTER`` names
        (``otlp`` over HTTP by default, or ``console``).

    Returns:
      ``(provider, counting_exporter)``; call :func:`shutdown_tracing` at the end.
    """
    if exporter is None:
        if not tracing_requested():
            return None
        kinds = [
            k.strip().lower() for k in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        ]
        if "console" in kinds:
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_* variables
    env_names = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if env_names else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    counting = CountingExporter(exporter)
    provider.add_span_processor(BatchSpanProcessor(counting))
    return provider, counting


def shutdown_tracing(provider: TracerProvider, *, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Flush and shut ``provider`` down, waiting at most ``timeout`` seconds.

    ``TracerProvider.shutdown`` exports what is batched and can wait for the exporter's
    own timeout (10 s for OTLP) and retries when the collector does not answer; a
    process stopping (SIGTERM) cannot wait that long. The shutdown runs on a daemon
    thread; spans it had not exported by the deadline are abandoned (the
    :class:`CountingExporter` counts what did fail).

    Returns:
      False when the deadline passed first.
    """
    done = threading.Event()

    def run() -> None:
        try:
            provider.shutdown()
        except Exception:  # pragma: no cover - the SDK logs its own errors
            logger.exception("penwatch: tracer provider shutdown failed")
        finally:
            done.set()

    threading.Thread(target=run, name="penwatch-otel-shutdown", daemon=True).start()
    if not done.wait(timeout):
        logger.warning(
            "penwatch: the span exporter did not finish within %.1fs (collector not "
            "answering?); remaining spans abandoned",
            timeout,
        )
        return False
    return True
