"""`publisher staging serve`: the Hub-protocol server for rehearsals and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The staging Hub (a local server speaking the Hub's API).", no_args_is_help=True)


@app.command()
def serve(
    root: Annotated[Path, typer.Option("--root", help="Where repos and blobs are stored.")] = Path(".publisher/staging"),
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0 picks a free one).")] = 8765,
    token: Annotated[str | None, typer.Option("--token", envvar="STAGING_HUB_TOKEN", show_envvar=True,
                                              help="Writes need 'Authorization: Bearer <token>'.")] = None,
    ready_file: Annotated[Path | None, typer.Option("--ready-file", help="Write the URL here once bound.")] = None,
) -> None:
    """Serve the staging Hub until interrupted (point HF_ENDPOINT at the printed URL, with HF_HUB_DISABLE_XET=1)."""
    from publisher.staging.server import serve as run_server

    run_server(root, host=host, port=port, token=token, ready_file=ready_file)
