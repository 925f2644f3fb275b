"""The staging Hub's refusals."""

from __future__ import annotations


class StoreError(Exception):
    """A refused operation: HTTP status, the Hub's X-Error-Code (if any), a message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
