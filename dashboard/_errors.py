"""The one error every dashboard source raises when it cannot be read now."""

from __future__ import annotations

__all__ = ["SourceUnavailable"]


class SourceUnavailable(RuntimeError):
    """The source cannot be read now (missing store, Prometheus down).

    The message is plain text for the user (the page shows it literally, never as
    Markdown) and says what to do.
    """
