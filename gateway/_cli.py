"""The ``pgqg`` command line (DESIGN §6)."""

from __future__ import annotations

from pathlib import Path

import click

from ._server import serve
from ._settings import ConfigError, load_settings


@click.group()
@click.version_option(package_name="pgqg")
def main() -> None:
    """pgqg: an async PostgreSQL query gateway."""


@main.command("serve")
@click.option("--config", type=click.Path(path_type=Path), help="TOML settings file.")
@click.option("--dsn", help="PostgreSQL connection string (PGQG_DSN, DATABASE_URL).")
@click.option("--host", help="Listen address (PGQG_HOST).")
@click.option("--port", type=int, help="Listen port (PGQG_PORT).")
@click.option("--pool-size", type=int, help="Connections (PGQG_POOL_SIZE).")
@click.option(
    "--shutdown-grace-s",
    type=float,
    help="On SIGTERM/SIGINT, seconds in-flight requests may finish (PGQG_SHUTDOWN_GRACE_S).",
)
def serve_command(
    config: Path | None,
    dsn: str | None,
    host: str | None,
    port: int | None,
    pool_size: int | None,
    shutdown_grace_s: float | None,
) -> None:
    """Run the gateway."""
    try:
        settings = load_settings(
            config,
            dsn=dsn,
            host=host,
            port=port,
            pool_size=pool_size,
            shutdown_grace_s=shutdown_grace_s,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not settings.dsn:
        raise click.UsageError("no database configured: pass --dsn or set PGQG_DSN")
    serve(settings, settings.dsn, on_ready=lambda url: click.echo(f"pgqg serving on {url}"))
