"""The staging Hub's HTTP API: the part of the Hub's protocol that huggingface_hub 2.x uses (LFS path, no Xet).

One module per API area, each a mixin over the shared HTTP layer (`http.py`: routing on the raw, still
percent-encoded path, errors, auth, body helpers); the storage under them is `storage.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from publisher.staging.api_commits import CommitsApi
from publisher.staging.api_files import FilesApi
from publisher.staging.api_lfs import LfsApi
from publisher.staging.api_refs import RefsApi
from publisher.staging.api_repos import ReposApi
from publisher.staging.http import DropConnection, Faults, header_safe
from publisher.staging.storage import HubStore

__all__ = ["DropConnection", "Faults", "HubApp", "create_app", "header_safe"]


class HubApp(ReposApi, RefsApi, FilesApi, CommitsApi, LfsApi):
    """The staging Hub: every API area's handlers over one store."""


def create_app(root: Any, token: str | None = None, faults: Faults | None = None) -> Starlette:
    hub = HubApp(HubStore(Path(root)), token=token, faults=faults)
    return hub.app
