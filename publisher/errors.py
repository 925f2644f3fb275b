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


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's errors for a connection that failed, broke or timed out (huggingface_hub 2.x ships its
    client as `httpx2`; older ones use `httpx`)."""
    import importlib

    found: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def environment_errors() -> tuple[type[BaseException], ...]:
    """Failures of the world outside (files, network, a server's answer), as opposed to bugs of this program."""
    return (OSError, *transport_errors())
