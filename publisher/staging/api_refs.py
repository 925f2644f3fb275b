"""The staging Hub's refs, commit history, branches, tags and discussions (pull requests)."""

from __future__ import annotations

import asyncio
import html
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from publisher.staging.http import (
    USER,
    HubBase,
    _json,
)
from publisher.staging.storage import (
    Repo,
    StoreError,
)


class RefsApi(HubBase):
    async def refs(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo)
        branches, prs = [], []
        for name, oid in self.store.refs(found).items():
            if name.startswith("refs/pr/"):
                prs.append({"name": name.removeprefix("refs/pr/"), "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        tags = [{"name": b["name"].removeprefix("refs/tags/"), "ref": b["name"], "targetCommit": b["targetCommit"]}
                for b in branches if b["name"].startswith("refs/tags/")]
        branches = [b for b in branches if not b["name"].startswith("refs/tags/")]
        payload: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if request.query_params.get("include_prs"):
            payload["pullRequests"] = prs
        return JSONResponse(payload)

    async def commits(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo)
        log = await asyncio.to_thread(self.store.history, self.store.resolve(found, rev))  # a query per commit
        formatted = "formatted" in request.query_params.getlist("expand[]")
        return JSONResponse([{"id": c["oid"], "title": c["title"], "message": c["message"], "date": c["date"],
                              "authors": [{"user": c["author"]}],
                              **({"formatted": {"title": html.escape(c["title"]),
                                                "message": html.escape(c["message"])}} if formatted else {})}
                             for c in log])

    async def create_branch(self, request: Request, t: str, repo: str, branch: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request, allow_empty=True)
        self.store.create_branch(found, branch, body.get("startingPoint"))
        return JSONResponse({})

    async def delete_branch(self, request: Request, t: str, repo: str, branch: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        self.store.delete_branch(found, branch)
        return JSONResponse({})

    async def discussions(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo)
        items = [{"num": d["num"], "title": d["title"], "status": d["status"], "isPullRequest": bool(d["is_pr"]),
                  "createdAt": d["created"], "author": {"name": d["author"]}, "numComments": 0, "pinned": False,
                  "repo": {"name": found.id, "type": found.type}}
                 for d in self.store.discussions(found)]
        return JSONResponse({"discussions": items, "count": len(items), "start": 0, "numClosedDiscussions": 0})

    async def open_discussion(self, request: Request, t: str, repo: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        title = body.get("title")
        if not isinstance(title, str) or not title.strip():
            raise StoreError(400, "A discussion needs a title")
        number = self.store.open_discussion(found, title.strip(), USER, pull_request=body.get("pullRequest") is True)
        return self._discussion_json(found, self.store.discussion(found, number))

    def _discussion_json(self, found: Repo, item: dict[str, Any]) -> JSONResponse:
        is_pr = bool(item["is_pr"])
        return JSONResponse({
            "num": item["num"], "title": item["title"], "status": item["status"], "isPullRequest": is_pr,
            "createdAt": item["created"], "author": {"name": item["author"]}, "events": [],
            "repo": {"name": found.id, "type": found.type}, "pinned": False, "diff": "",
            **({"changes": {"base": "refs/heads/main", "mergeCommitId": None}, "filesWithConflicts": []}
               if is_pr else {})})

    async def discussion(self, request: Request, t: str, repo: str, num: str) -> Response:
        found = self._repo(request, t, repo)
        return self._discussion_json(found, self.store.discussion(found, int(num[:9])))

    async def create_tag(self, request: Request, t: str, repo: str, rev: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        body = await _json(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise StoreError(400, "'tag' is required")
        self.store.create_tag(found, tag, rev)
        return JSONResponse({})

    async def delete_tag(self, request: Request, t: str, repo: str, tag: str) -> Response:
        found = self._repo(request, t, repo, write=True)
        self.store.delete_tag(found, tag)
        return JSONResponse({})

    # -- trees --------------------------------------------------------------------------------------------

