"""Run the staging Hub: bind (port 0 picks a free one), announce the URL, serve until stopped."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import uvicorn

from publisher.staging.app import HubApp
from publisher.staging.storage import HubStore
from publisher.util.atomic import atomic_write_text


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
                            h11_max_incomplete_event_size=1024 * 1024)
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
