"""Run the staging Hub: bind (port 0 picks a free one), announce the URL, serve until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from publisher.staging.app import HubApp
from publisher.staging.rawbody import EXTENSION, MIN_BODY, RawBody
from publisher.staging.storage import HubStore
from publisher.util.atomic import atomic_write_text

# A request's headers must arrive within this long of its first byte (or of the connection): a client that sends
# them a byte at a time (slowloris) is dropped, not kept forever. uvicorn's own timer runs between requests only.
HEADER_DEADLINE_S = float(os.environ.get("PUBLISHER_STAGING_HEADER_DEADLINE_S", "10"))
# Connections (and requests in flight) at most; past it new ones get 503 rather than starving the others.
MAX_CONNECTIONS = 512
# Past this many connections, a new one closes the oldest connection that is in no request (sending its headers a
# byte at a time, or idle between requests): held-open sockets cannot fill the cap and lock the others out of it.
EVICT_AT = MAX_CONNECTIONS - 64


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, the connections in no request
    evicted oldest first when the server nears its connection cap, and a large PUT body offered raw to its handler
    (rawbody.py: the connection lent out for the body and taken back after it)."""

    _deadline: asyncio.TimerHandle | None = None
    _raw: RawBody | None = None
    # connections in no request (new, sending headers, idle between requests), oldest first; one event loop
    _waiting: ClassVar[OrderedDict[DeadlineProtocol, None]] = OrderedDict()

    def _wait(self) -> None:
        self._waiting[self] = None
        self._waiting.move_to_end(self)

    def _evict(self) -> None:
        while len(self.connections) > EVICT_AT and self._waiting:
            oldest = next(iter(self._waiting))
            if oldest is self:
                break
            del self._waiting[oldest]
            oldest._disarm()
            if not oldest.transport.is_closing():
                oldest.transport.close()
            self.connections.discard(oldest)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_DEADLINE_S, self._drop)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _drop(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._wait()
        self._evict()
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._raw = None
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._waiting.pop(self, None)  # in a request: never evicted
        super().on_headers_complete()
        length = dict(self.headers).get(b"content-length", b"")
        if (self.scope.get("method") == "PUT" and length.isdigit() and len(length) <= 15
                and int(length) >= MIN_BODY and not self.expect_100_continue):
            self._raw = RawBody(self, self.cycle, int(length))
            cast(dict[str, Any], self.scope).setdefault("extensions", {})[EXTENSION] = self._raw

    def on_body(self, body: bytes) -> None:
        if self._raw is not None:
            self._raw.parsed += len(body)
        super().on_body(body)

    # -- the raw body's side (rawbody.HttpSide) ------------------------------------------------------------

    def raw_body_taken(self, cycle: Any) -> tuple[bytes, bool]:
        prefix = bytes(cycle.body)
        cycle.body = bytearray()
        complete = not cycle.more_body
        if not complete:
            self.flow.pause_reading()  # flagged paused: the answer's completion resumes HTTP reading
        return prefix, complete

    def raw_body_returned(self, cycle: Any, keep_alive: bool) -> None:
        # the parser still waits for the body it never saw: a fresh one reads the next request
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        if self._raw is not None and self._raw.cycle is cycle:
            self._raw = None
        cycle.more_body = False
        cycle.message_event.set()
        if not keep_alive:
            cycle.keep_alive = False  # the body was not read to its end: the connection ends with the answer

    def raw_connection_lost(self, exc: Exception | None) -> None:
        self.connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request started
            self._wait()  # idle until its next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._waiting.pop(self, None)
        super().connection_lost(exc)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(root: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          ready_file: Path | None = None, announce: bool = True, log_level: str = "warning") -> None:
    """Serve until interrupted. `ready_file` receives the URL once the socket is bound (for tests and scripts)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = HubStore(root)
    store.clean_temp()
    hub = HubApp(store, token=token)
    sock = bind(host, port)
    url = url_of(sock, host)
    logging.getLogger("uvicorn.error").setLevel(log_level.upper())
    # loop/http "auto" take uvloop and httptools (dependencies): a 1 GiB upload 7.1 s -> 3.1 s with the changes
    # that came with them (bench/staging_transfer.py); the pure-Python h11 parser was the bound
    config = uvicorn.Config(hub.app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                            h11_max_incomplete_event_size=1024 * 1024, http=DeadlineProtocol,
                            limit_concurrency=MAX_CONNECTIONS)
    server = uvicorn.Server(config)
    if ready_file is not None:
        atomic_write_text(ready_file, url + "\n")
    if announce:
        auth = "writes need the token" if token else "no token: writes are open"
        print(f"staging Hub at {url} (root {root}; {auth})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
