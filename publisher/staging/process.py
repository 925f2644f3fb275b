"""Start the staging Hub in a subprocess on a given (or free) port and wait until it answers (tests, demo)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StagingHub:
    url: str
    token: str | None
    root: Path
    process: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def start_staging_hub(root: Path, port: int = 0, token: str | None = None,
                      env: dict[str, str] | None = None) -> Iterator[StagingHub]:
    ready = root.parent / f"{root.name}.url"
    ready.unlink(missing_ok=True)
    log = root.parent / f"{root.name}.log"
    command = [sys.executable, "-m", "publisher", "staging", "serve", "--root", str(root), "--port", str(port),
               "--ready-file", str(ready)]
    child_env = {**os.environ, **(env or {})}
    if token:
        child_env["STAGING_HUB_TOKEN"] = token  # through the environment: never on a command line
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"staging Hub exited: {log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("staging Hub did not start in 60 s")
            time.sleep(0.05)
        url = ready.read_text().strip()
        while True:  # bound is not the same as serving: wait for the first answer
            try:
                urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=2)
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            else:
                break
        yield StagingHub(url=url, token=token, root=root, process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
