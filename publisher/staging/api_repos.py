"""The staging Hub's repo endpoints: create, delete, move, list, settings, info, validate-yaml, whoami, stats."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from publisher.staging.cards import validate_card
from publisher.staging.http import (
    PREFIXES,
    USER,
    HubBase,
    _json,
    _private,
    header_safe,
)
from publisher.staging.storage import (
    StoreError,
)


class ReposApi(HubBase):
    # -- repos --------------------------------------------------------------------------------------------

    async def create_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not isinstance(org, str | None):
            raise StoreError(400, "'name' is required, and it and 'organization' must be strings")
        repo_id = f"{org}/{name}" if org else name
        if "/" not in repo_id:
            repo_id = f"{USER}/{repo_id}"
        repo_type = _repo_type(body)
        if repo_type not in PREFIXES:
            raise StoreError(400, f"Invalid repo type '{repo_type}'")
        repo, created = self.store.create_repo(repo_type, repo_id, _private(body), USER)
        url = f"{self._base(request)}/{PREFIXES[repo_type]}{repo.id}"
        if not created:
            return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
        return JSONResponse({"url": url, "name": repo.id})

    async def delete_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        name, org = body.get("name"), body.get("organization")
        if not isinstance(name, str) or not isinstance(org, str | None):
            raise StoreError(400, "'name' and 'organization' must be strings")
        repo_id = f"{org}/{name}" if org else name
        repo_type = _repo_type(body)
        if repo_type not in PREFIXES:
            raise StoreError(400, f"Invalid repo type '{repo_type}'")
        repo = self._repo(request, repo_type + "s", repo_id)
        self.store.delete_repo(repo)
        return JSONResponse({})

    async def move_repo(self, request: Request) -> Response:
        self._require_write(request)
        body = await _json(request)
        source, target, repo_type = body.get("fromRepo"), body.get("toRepo"), _repo_type(body)
        if not isinstance(source, str) or not isinstance(target, str) or repo_type not in PREFIXES:
            raise StoreError(400, "'fromRepo' and 'toRepo' are required, 'type' must be model, dataset or space")
        self.store.move_repo(self._repo(request, repo_type + "s", source, write=True), target)
        return JSONResponse({})

    async def list_repos(self, request: Request, t: str) -> Response:
        """GET /api/models (list_models): the repos this caller may see, filtered by author and search text."""
        params = request.query_params
        author, search = params.get("author"), (params.get("search") or "").lower()
        try:
            limit = max(1, min(int(params.get("limit", "1000")), 1000))
        except ValueError as exc:
            raise StoreError(400, "'limit' must be an integer") from exc
        # every repo's head and date: a query per repo, off the event loop
        items = await asyncio.to_thread(self._listed, t.removesuffix("s"), self._authenticated(request), author,
                                        search)
        if params.get("sort") in ("lastModified", "createdAt"):
            items.sort(key=lambda item: item[params["sort"]], reverse=params.get("direction") != "1")
        return JSONResponse(items[:limit])

    def _listed(self, repo_type: str, visible: bool, author: str | None, search: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for found in self.store.list_repos(repo_type):
            if (found.private and not visible) or (author and found.id.split("/")[0] != author) or \
                    (search and search not in found.id.lower()):
                continue
            head = self.store.refs(found).get("main")
            items.append({"_id": str(found.pk), "id": found.id, "modelId": found.id, "author": found.id.split("/")[0],
                          "sha": head, "private": found.private, "createdAt": found.created,
                          "lastModified": self.store.commit_info(head).get("date") if head else found.created,
                          "downloads": 0, "likes": 0, "tags": [], "gated": found.gated or False,
                          "disabled": False})
        return items

    async def super_squash(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request, allow_empty=True)
        message = body.get("message") or f"Super-squash branch '{rev}'"
        if not isinstance(message, str):
            raise StoreError(400, "'message' must be a string")
        oid = await asyncio.to_thread(self.store.super_squash, found, rev, message, USER)  # copies the whole tree
        return JSONResponse({"commitId": oid})

    async def settings(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        if "private" in body or "visibility" in body:
            self.store.set_private(found, _private(body))
        if "gated" in body:
            gated = body["gated"]
            if gated is not False and gated not in ("auto", "manual"):
                raise StoreError(400, "'gated' must be false, 'auto' or 'manual'")
            self.store.set_gated(found, gated or "")
        return JSONResponse({})

    async def stats(self, request: Request) -> Response:
        """Not part of the Hub's API: request and byte counts, so tests can prove that nothing was re-sent (for the
        token's holder only)."""
        self._require_write(request)
        return JSONResponse({"requests": self.faults.seen, "bytes_received": self.bytes_received,
                             "bytes_sent": self.bytes_sent})

    async def whoami(self, request: Request) -> Response:
        if not self._authenticated(request):
            raise StoreError(401, "Invalid credentials in Authorization header")
        return JSONResponse({"type": "user", "name": USER, "fullname": "Staging Hub user", "orgs": [],
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "staging", "role": "write"}}})

    async def validate_yaml(self, request: Request) -> Response:
        body = await _json(request)
        # parsing up to 256 KiB of YAML is CPU work (~0.6 s): off the event loop
        errors, warnings = await asyncio.to_thread(validate_card, str(body.get("content", "")))
        payload: dict[str, Any] = {"errors": [{"message": e} for e in errors],
                                   "warnings": [{"message": w} for w in warnings]}
        if not errors:
            return JSONResponse(payload)
        payload["error"] = "Invalid metadata in README.md: " + "; ".join(errors)
        response = JSONResponse(payload, status_code=400)
        response.headers["X-Error-Message"] = header_safe(payload["error"])[:200]
        return response

    async def repo_info(self, request: Request, t: str, repo: str, rev: str = "main") -> Response:
        found = self._repo(request, t, repo)
        commit = self.store.resolve(found, rev)
        info = self.store.commit_info(commit)
        siblings = await asyncio.to_thread(self._siblings, commit)  # every file of the commit: off the event loop
        return JSONResponse({
            "_id": str(found.pk), "id": found.id, "modelId": found.id, "author": found.id.split("/")[0],
            "sha": commit, "lastModified": info.get("date"), "createdAt": found.created, "private": found.private,
            "gated": found.gated or False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def _siblings(self, commit: str) -> list[dict[str, Any]]:
        siblings = []
        for entry in self.store.files(commit):
            sibling: dict[str, Any] = {"rfilename": entry.path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}
            siblings.append(sibling)
        return siblings


def _repo_type(body: dict[str, Any]) -> str:
    value = body.get("type") or "model"
    if not isinstance(value, str):
        raise StoreError(400, "'type' must be model, dataset or space")
    return value
