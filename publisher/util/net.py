"""Network failures as one line: the host, what was being done, and the cause.

A connection refused or dropped, a timeout, an HTTP error the caller did not expect, or an answer that is not what a
Hugging Face Hub sends (another service on that port) become a `NetworkError` naming all three, never a traceback
or an "internal error".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from publisher.errors import PublisherError, transport_errors


class NetworkError(PublisherError):
    """Talking to a server failed; the message names the host and what was being done."""


def host_of(endpoint: str | None) -> str:
    parsed = urlparse(endpoint or "https://huggingface.co")
    return parsed.netloc or str(endpoint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@contextmanager
def talking_to(endpoint: str | None, what: str, token_name: str | None = None) -> Iterator[None]:
    """Wrap calls to a Hub: `what` is the action in words ("listing files of org/repo"); `token_name`, the
    variable whose token the command sent (named when the server refuses it)."""
    from huggingface_hub.errors import HfHubHTTPError

    host = host_of(endpoint)
    try:
        yield
    except PublisherError:
        raise
    except transport_errors() as exc:
        raise NetworkError(f"{what} at {host}: {cause_of(exc)}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise NetworkError(f"{what} at {host}: {_first_line(exc)}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hub_like = exc.response is not None and any(
            name in exc.response.headers for name in ("x-error-code", "x-error-message", "x-request-id"))
        if not hub_like and status not in (401, 403, 429) and status is not None and status < 500:
            raise NetworkError(f"{what} at {host}: the server answered {status} the way no Hugging Face Hub does "
                               f"(is {host} a Hub?)") from exc
        hint = f" (check {token_name}, the token this command sent)" if status in (401, 403) and token_name else ""
        raise NetworkError(f"{what} at {host}: the server answered {status}{hint}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NetworkError(f"{what} at {host}: the answer is not what a Hugging Face Hub sends ({_first_line(exc)}); "
                           f"is {host} a Hub?") from exc


def cause_of(exc: BaseException) -> str:
    """The innermost reason of a transport error (`[Errno 111] Connection refused`, `timed out`)."""
    inner: BaseException = exc
    while (deeper := inner.__cause__ or inner.__context__) is not None:
        inner = deeper
    text = str(inner).strip() or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
