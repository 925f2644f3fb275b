"""Which token goes to which Hub: a token is only ever sent to the endpoint it was meant for.

The real Hub (https://huggingface.co, https://hf.co) gets HF_TOKEN, or the login huggingface_hub has stored; any
other endpoint (the staging Hub, a test server) gets STAGING_HUB_TOKEN or nothing. Callers pass `token or False`
to huggingface_hub, so that a missing token never makes the client look one up on its own.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

HUB_ENDPOINT = "https://huggingface.co"
_HUB_HOSTS = frozenset({"huggingface.co", "hf.co"})
STAGING_TOKEN_VARIABLE = "STAGING_HUB_TOKEN"


def is_real_hub(endpoint: str) -> bool:
    parsed = urlparse(endpoint)
    return parsed.scheme == "https" and (parsed.hostname or "").lower() in _HUB_HOSTS and parsed.port in (None, 443)


def effective_endpoint(endpoint: str | None) -> str:
    """The endpoint huggingface_hub would use for `endpoint` (None: HF_ENDPOINT, else the real Hub)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")


def token_for(endpoint: str | None) -> str | None:
    if is_real_hub(effective_endpoint(endpoint)):
        token = os.environ.get("HF_TOKEN")
        if not token:
            from huggingface_hub import get_token

            token = get_token()
        return token or None
    return os.environ.get(STAGING_TOKEN_VARIABLE) or None


def token_variable(endpoint: str | None) -> str:
    """The environment variable whose token a command sends to `endpoint` (for hints after a 401/403)."""
    return "HF_TOKEN" if is_real_hub(effective_endpoint(endpoint)) else STAGING_TOKEN_VARIABLE
