"""Errors the CLI turns into one-line messages (no traceback unless --debug)."""

from __future__ import annotations


class PublisherError(Exception):
    """A failure with a message meant for the user, one line per entry of `lines`."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or [message]


class ManifestError(PublisherError):
    """One or more manifest problems, each `file:line: field: message`."""


class SourceError(PublisherError):
    """The source model cannot be read as asked (missing component, unknown revision)."""


class ToolchainError(PublisherError):
    """A tool the step needs is missing or failed (for example the Core ML compiler off macOS)."""
