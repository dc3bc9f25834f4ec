"""The ``pgqg`` command line (DESIGN §6): serve, query, run, db init, top, token.

click parses the command line; rich draws tables and progress bars; statements of a
file are split by `gateway.catalog._sqlfile` on PostgreSQL's own scanner. Every setting comes
from `load_settings` (defaults < ``--config`` TOML < environment < flags): this module
reads no environment variable itself.

Exit status: 0 on success, 1 when a statement failed or the database or gateway could
not be reached, 2 for a usage error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
import psycopg.conninfo
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .._build import compiled_modules
from .._settings import (
    ConfigError,
    ConfigFileError,
    Settings,
    load_settings,
    unknown_variables,
)
from ..catalog import Catalog, CatalogError
from ..catalog._sqlfile import SqlFileError, SqlStatement, split_statements
from ..web._auth import Authenticator
from ..web._privileges import PrivilegedRoleError
from ..web._server import serve
from ..web._supervisor import WorkersKeepDying, supervise
from ._client import GatewayRefused, GatewayUnreachable
from ._demo import DEMO_FILES, DemoError, load_demo
from ._output import FORMATS, SHAPES, Format, Shape, write_outcome
from ._targets import DirectTarget, GatewayTarget, StatementFailed, Target, TargetUnavailable
from ._token import NoSecret, make_token
from ._top import run_top

_CONFIG = click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML settings file."
)
_DSN = click.option(
    "--dsn", metavar="DSN", help="PostgreSQL connection string (else PGQG_DSN, DATABASE_URL)."
)
_URL = click.option(
    "--url",
    metavar="URL",
    help="A running gateway, e.g. http://127.0.0.1:8080 (instead of --dsn).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pgqg")
def main() -> None:
    """pgqg: an async PostgreSQL query gateway.

    \b
    pgqg serve                      the gateway (an embedded PostgreSQL with the demo
                                    when no database is configured)
    pgqg query 'select $1::int + 1' 41
    pgqg run migrations.sql --dsn postgresql://...
    pgqg db init --dsn postgresql://...
    pgqg top --url http://127.0.0.1:8080
    pgqg token --role bookshop_reader --sub ana
    """
    for warning in unknown_variables():
        click.echo(f"pgqg: warning: {warning}", err=True)


# --- settings, targets, errors ---------------------------------------------------------


class _BadFile(click.ClickException):
    """A file the command reads is malformed: one line naming file and line, exit 2
    (a usage error, as click exits for a bad flag)."""

    exit_code = 2


def _settings(config: Path | None, **overrides: Any) -> Settings:
    """Load the settings; a bad value is a usage error naming the setting, a bad
    ``--config`` file one line naming the file."""
    try:
        return load_settings(config, **overrides)
    except ConfigFileError as exc:
        raise _BadFile(str(exc)) from None
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _fail(message: str) -> NoReturn:
    click.echo(f"pgqg: {message}", err=True)
    sys.exit(1)


def _local_url(settings: Settings) -> str:
    """The URL of a gateway on this machine listening as `settings` say."""
    host = settings.host
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _open_target(settings: Settings, url: str | None) -> Target:
    """--url: that gateway; else the configured database (--dsn, PGQG_DSN,
    DATABASE_URL); else the gateway `pgqg serve` would run here with these settings."""
    try:
        if url:
            return GatewayTarget(url)
        if settings.dsn:
            return DirectTarget(settings.dsn, settings)
        return GatewayTarget(
            _local_url(settings),
            hint=" (no --dsn or --url given, nor PGQG_DSN: start the gateway with "
            "pgqg serve, or say where to go)",
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    except TargetUnavailable as exc:
        _fail(str(exc))


def _check_one_target(dsn: str | None, url: str | None) -> None:
    if dsn and url:
        raise click.UsageError("give --dsn or --url, not both")


def _error_lines(exc: StatementFailed) -> list[str]:
    """The error as psql prints it: ERROR, DETAIL, HINT."""
    first = f"ERROR:  {exc.message}"
    if exc.sqlstate:
        first += f" (SQLSTATE {exc.sqlstate})"
    elif exc.code:
        first += f" ({exc.code}, HTTP {exc.status})"
    lines = [first]
    if exc.detail:
        lines.append(f"DETAIL:  {exc.detail}")
    if exc.hint:
        lines.append(f"HINT:  {exc.hint}")
    return lines


def _describe_dsn(dsn: str) -> str:
    """Database, host and port of `dsn`, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the database"
    where = str(info.get("host") or "the local socket")
    if info.get("port"):
        where += f":{info['port']}"
    return f"database {info.get('dbname') or info.get('user') or '(default)'} on {where}"


# --- serve -----------------------------------------------------------------------------


class _Stop(Exception):
    """A stop signal arrived while the embedded server was starting."""


class _StopSignals:
    """Signals while ``pgqg serve`` runs an embedded server, so it is always stopped.

    While the server starts and the demo loads, SIGINT, SIGTERM and SIGHUP are only
    recorded, and `check` raises `_Stop` between steps: an exception in the middle
    of ``pg_ctl start`` could leave a postmaster that nothing stops. Once the gateway
    runs, aiohttp handles SIGINT and SIGTERM itself (a graceful stop); SIGHUP (a
    closed terminal) is turned into SIGTERM, as its default action would kill us
    before the embedded server is stopped.
    """

    # no SIGHUP on Windows
    _SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.received: int | None = None
        self._serving = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._serving:
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.received is None:
            self.received = signum

    def install(self) -> None:
        for sig in self._SIGNALS:
            signal.signal(sig, self._handle)

    def check(self) -> None:
        """Raises `_Stop` when a stop signal arrived."""
        if self.received is not None:
            raise _Stop(signal.Signals(self.received).name)

    def serving(self) -> None:
        """The gateway's own handlers are in place (called from its start-up hook);
        a signal recorded just before is handed on to them."""
        self._serving = True
        if self.received is not None:
            os.kill(os.getpid(), signal.SIGTERM)

    @staticmethod
    def ignore() -> None:
        """While the embedded server stops: a second Ctrl-C must not cut that short
        (the stop itself is bounded: SIGKILL after 30 s)."""
        for sig in _StopSignals._SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def _announce(
    settings: Settings, *, demo: bool, then: Callable[[], None] | None = None
) -> Callable[[str], None]:
    url = _local_url(settings)

    def on_ready(_listen_url: str) -> None:
        click.echo(f"pgqg is serving on {url}")
        if settings.workers > 1:
            click.echo(
                f"  {settings.workers} worker processes,"
                f" {settings.pool_size} database connections each"
            )
        if settings.console:
            click.echo(f"  query console: {url}/")
        if not compiled_modules():
            click.echo("  the request path is plain Python, not compiled (see docs/performance.md)")
        if demo:
            click.echo(f"  try:  curl '{url}/v1/queries/book_by_id?id=7'")
            click.echo(f"        pgqg query --url {url} 'select count(*) from book'")
        click.echo("  stop with Ctrl-C (or SIGTERM)")
        if then is not None:
            then()

    return on_ready


@main.command("serve")
@_CONFIG
@_DSN
@click.option("--host", help="Listen address (PGQG_HOST).")
@click.option("--port", type=int, help="Listen port (PGQG_PORT).")
@click.option("--pool-size", type=int, help="Connections of each worker process (PGQG_POOL_SIZE).")
@click.option(
    "--workers",
    type=int,
    help="Processes serving the port, each with its own pool (PGQG_WORKERS).",
)
@click.option(
    "--raw-sql",
    type=click.Choice(["off", "read-only", "read-write"]),
    help="Raw SQL over HTTP (PGQG_RAW_SQL).",
)
@click.option(
    "--allow-privileged-role",
    is_flag=True,
    default=None,
    help="Serve raw SQL even as a superuser or a role with server-file, signal, replication "
    "or BYPASSRLS privileges (PGQG_ALLOW_PRIVILEGED_ROLE).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Embedded PostgreSQL's data directory (PGQG_DATA_DIR).",
)
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
    workers: int | None,
    raw_sql: str | None,
    allow_privileged_role: bool | None,
    data_dir: Path | None,
    shutdown_grace_s: float | None,
) -> None:
    """Run the gateway until Ctrl-C or SIGTERM.

    With a database configured (--dsn, PGQG_DSN, DATABASE_URL) it serves that one;
    with raw SQL on, it refuses a login role that is a superuser or may reach the
    server's files or sessions (see docs/security.md). Without, it starts an embedded
    PostgreSQL in PGQG_DATA_DIR, loads the demo bookshop there once (sql/schema.sql,
    sql/seed.sql) as its superuser and serves it as the role pgqg_anon; stopping the
    gateway stops that server too.

    \b
    pgqg serve
    pgqg serve --dsn postgresql://app:secret@db.example:5432/app --port 9000
    pgqg serve --workers 2      two processes on the port, a supervisor restarts them
    """
    settings = _settings(
        config,
        dsn=dsn,
        host=host,
        port=port,
        pool_size=pool_size,
        workers=workers,
        raw_sql=raw_sql,
        allow_privileged_role=allow_privileged_role,
        data_dir=data_dir,
        shutdown_grace_s=shutdown_grace_s,
    )
    if settings.workers > 1 and settings.port == 0:
        raise click.UsageError("--workers needs a fixed --port (with 0 each would get its own)")
    _check_listen_address(settings)
    _check_catalog(settings)
    try:
        Authenticator(settings)  # a bad JWKS file fails now, not after PostgreSQL started
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if settings.dsn:
        click.echo(f"pgqg: serving {_describe_dsn(settings.dsn)}")
        _serve(settings, settings.dsn, _announce(settings, demo=False))
        return
    _serve_embedded(settings)


def _check_listen_address(settings: Settings) -> None:
    """Fail now, before an embedded server is started for nothing, when the listen
    address cannot be bound (a port taken by another gateway, most often)."""
    if settings.port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            settings.host or None, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
            sock.bind(address)
    except OSError as exc:
        _fail(f"cannot serve on {settings.host}:{settings.port}: {exc.strerror or exc}")


def _check_catalog(settings: Settings) -> None:
    """Fail now, before an embedded server is started for nothing, when a named-query
    file is malformed (the gateway would refuse to start with it)."""
    try:
        Catalog.load(settings.sql_dir / "queries")
    except CatalogError as exc:
        raise _BadFile(f"bad named-query file {exc}") from None


def _serve(settings: Settings, dsn: str, on_ready: Callable[[str], None]) -> None:
    """`serve`, or `supervise` its workers; a taken port (or another socket error at
    start), a login role refused for raw SQL, or workers that keep dying as one line."""
    try:
        if settings.workers > 1:
            supervise(settings, dsn, on_ready=on_ready)
        else:
            serve(settings, dsn, on_ready=on_ready)
    except OSError as exc:
        _fail(f"cannot serve on {settings.host}:{settings.port}: {exc.strerror or exc}")
    except WorkersKeepDying as exc:
        _fail(f"stopped: {exc}")
    except PrivilegedRoleError as exc:
        _fail(f"refusing to serve: {exc}")
    except CatalogError as exc:  # a file changed since _check_catalog read it
        raise _BadFile(f"bad named-query file {exc}") from None


def _serve_embedded(settings: Settings) -> None:
    """Start the embedded server, load the demo once, serve, and always stop it."""
    from ..embedded._postgres import EmbeddedError, EmbeddedPostgres, server_processes

    signals = _StopSignals()
    signals.install()
    data_dir = settings.data_dir.expanduser()
    click.echo("pgqg: no database configured (--dsn, PGQG_DSN, DATABASE_URL):")
    click.echo(f"  embedded PostgreSQL, data in {data_dir}  (move it with PGQG_DATA_DIR)")
    embedded = EmbeddedPostgres(data_dir)
    try:
        started = time.monotonic()
        try:
            embedded.start()
        except EmbeddedError:
            if not embedded.is_running() and server_processes(data_dir):
                # another gateway's server, most likely: never stop it under that gateway
                _fail(
                    f"another PostgreSQL server already runs on {data_dir} (another"
                    " pgqg serve?): give this gateway its own data directory with"
                    " --data-dir (PGQG_DATA_DIR), or stop the other gateway first"
                )
            raise
        how = "created and started" if embedded.initialized_now else "started"
        click.echo(f"  PostgreSQL {how} in {time.monotonic() - started:.1f} s")
        if embedded.upgraded_now:
            click.echo(
                f"  upgraded the data directory in place: requests now run as the role "
                f"{embedded.request_role}, no longer as the superuser (docs/security.md)"
            )
        signals.check()
        if load_demo(embedded.dsn, settings.sql_dir):
            click.echo(f"  loaded the demo bookshop ({', '.join(DEMO_FILES)})")
        else:
            click.echo("  the demo bookshop is already loaded (kept as it is)")
        click.echo(f"  psql '{embedded.dsn}'  (the superuser, for administration)")
        click.echo(
            f"  requests run as the role {embedded.request_role}, not a superuser, logged in"
        )
        click.echo(f"  as '{embedded.gateway_dsn}'")
        signals.check()
        _serve(settings, embedded.gateway_dsn, _announce(settings, demo=True, then=signals.serving))
    except _Stop as stop:
        click.echo(f"pgqg: {stop} before the gateway was ready", err=True)
    except EmbeddedError as exc:
        _fail(f"the embedded PostgreSQL failed: {exc}")
    except DemoError as exc:
        _fail(f"could not load the demo: {exc.message}")
    finally:
        _StopSignals.ignore()
        if embedded.is_running():
            click.echo("pgqg: stopping the embedded PostgreSQL", err=True)
        try:
            embedded.stop()
        except EmbeddedError as exc:
            _fail(str(exc))


# --- query -----------------------------------------------------------------------------


@main.command(
    "query",
    # a parameter such as -5 is a parameter, not an unknown option
    context_settings={"ignore_unknown_options": True},
)
@_CONFIG
@_DSN
@_URL
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--shape",
    type=click.Choice(SHAPES),
    default="objects",
    show_default=True,
    help="Rows as objects or arrays (json, ndjson).",
)
@click.argument("sql")
@click.argument("params", nargs=-1, type=click.UNPROCESSED)
def query_command(
    config: Path | None,
    dsn: str | None,
    url: str | None,
    fmt: Format,
    shape: Shape,
    sql: str,
    params: tuple[str, ...],
) -> None:
    """Run one statement, directly (--dsn) or through a running gateway (--url).

    Parameters follow the SQL and fill $1, $2, ... (typed by PostgreSQL from the
    statement). Without --dsn or --url: the configured database (PGQG_DSN,
    DATABASE_URL), else the gateway on PGQG_HOST:PGQG_PORT.

    \b
    pgqg query --dsn postgresql://localhost/app 'select $1::int + 1' 41
    pgqg query --url http://127.0.0.1:8080 'select * from book where id = $1' 7 --format json
    """
    _check_one_target(dsn, url)
    try:
        statements = split_statements(sql)
    except SqlFileError as exc:
        raise click.BadParameter(exc.message, param_hint="SQL") from None
    if len(statements) > 1:
        raise click.BadParameter(
            f"{len(statements)} statements given; pgqg query runs one "
            "(put several in a file for pgqg run)",
            param_hint="SQL",
        )
    target = _open_target(_settings(config, dsn=dsn), url)
    # sys.stdout.buffer, not click.get_binary_stream (deprecated in click 8.5)
    out = sys.stdout.buffer
    try:
        with _failures_reported():
            if isinstance(target, GatewayTarget) and fmt in ("csv", "ndjson"):
                # every row, streamed as it comes, as directly: not the JSON answer
                # cut at the gateway's max_rows
                for chunk in target.stream(sql, list(params), fmt, shape):
                    out.write(chunk)
                    out.flush()
                return
            outcome = target.run(sql, list(params))
    finally:
        target.close()
    write_outcome(outcome, fmt, shape=shape, binary_out=out, console=Console(highlight=False))
    if outcome.truncated and fmt != "table":
        click.echo("pgqg: the gateway cut the result at its max_rows", err=True)


@contextlib.contextmanager
def _failures_reported() -> Iterator[None]:
    """A failed statement printed as psql prints it, exit 1; an unreachable target
    one line, exit 1."""
    try:
        yield
    except StatementFailed as exc:
        for line in _error_lines(exc):
            click.echo(line, err=True)
        sys.exit(1)
    except TargetUnavailable as exc:
        _fail(str(exc))


# --- run -------------------------------------------------------------------------------


@main.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@_CONFIG
@_DSN
@_URL
@click.option(
    "--continue",
    "keep_going",
    is_flag=True,
    help="Run the remaining statements after one fails (the exit status is still 1).",
)
def run_command(
    file: str, config: Path | None, dsn: str | None, url: str | None, keep_going: bool
) -> None:
    """Run a file of SQL statements in order ('-' reads standard input).

    Directly (--dsn) the statements share one session, as in psql: SET and BEGIN ...
    COMMIT work across statements. Through a gateway (--url) each one is its own
    request and transaction, under the gateway's raw SQL mode. Stops at the first
    failing statement unless --continue.

    \b
    pgqg run sql/schema.sql --dsn postgresql://localhost/app
    """
    _check_one_target(dsn, url)
    name = "<stdin>" if file == "-" else file
    try:
        with click.open_file(file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {name}: {exc}")
    try:
        statements = split_statements(text)
    except SqlFileError as exc:
        _fail(f"{name}:{exc.line}: {exc.message}; nothing was run")
    if not statements:
        click.echo(f"no statements in {name}")
        return
    target = _open_target(_settings(config, dsn=dsn), url)
    started = time.monotonic()
    try:
        failed = _run_statements(target, statements, name, keep_going=keep_going)
    finally:
        target.close()
    elapsed = time.monotonic() - started
    total = len(statements)
    if not failed:
        plural = "s" if total != 1 else ""
        click.echo(f"ran {total} statement{plural} from {name} in {elapsed:.2f} s")
        return
    where = ", ".join(f"{s.number} (line {s.line})" for s in failed)
    if keep_going:
        click.echo(
            f"ran {total} statements from {name}: {total - len(failed)} succeeded, "
            f"{len(failed)} failed: {where}"
        )
    else:
        first = failed[0]
        click.echo(
            f"ran {first.number - 1} of {total} statements from {name}: statement {where} "
            f"failed, {total - first.number} not run"
        )
    sys.exit(1)


def _run_statements(
    target: Target, statements: list[SqlStatement], name: str, *, keep_going: bool
) -> list[SqlStatement]:
    """Run `statements` with a progress bar on a terminal; returns the failed ones."""
    failed: list[SqlStatement] = []
    console = Console(stderr=True, highlight=False)
    progress = Progress(
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}", markup=False),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # quiet in pipes, logs and CI
    )
    with progress:
        task = progress.add_task("", total=len(statements), name=name)
        for statement in statements:
            progress.update(task, description=statement.summary)
            try:
                target.run(statement.text)
            except StatementFailed as exc:
                failed.append(statement)
                line = statement.line_of(exc.position)
                progress.console.print(
                    f"{name}:{line}: statement {statement.number} failed: {statement.summary}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,  # a path and a message are not to be folded at 80
                )
                for text in _error_lines(exc):
                    progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
                if not keep_going:
                    break
            except TargetUnavailable as exc:
                progress.stop()
                _fail(f"{exc} (at statement {statement.number}, line {statement.line})")
            progress.advance(task)
    return failed


# --- top -------------------------------------------------------------------------------


@main.command("top")
@_CONFIG
@_URL
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between frames.",
)
@click.option("--once", is_flag=True, help="Print one frame (two samples apart) and exit.")
def top_command(config: Path | None, url: str | None, interval: float, once: bool) -> None:
    """A live view of a running gateway: its queue, each connection's load,
    throughput and latency percentiles. Ctrl-C to stop.

    Without --url: the gateway on PGQG_HOST:PGQG_PORT.

    \b
    pgqg top --url http://127.0.0.1:8080
    """
    target = url or _local_url(_settings(config))
    try:
        run_top(target, interval=interval, once=once, console=Console(highlight=False))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    except (GatewayUnreachable, GatewayRefused) as exc:
        _fail(str(exc))


# --- db --------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database chores."""


@db_group.command("init")
@_CONFIG
@_DSN
def db_init_command(config: Path | None, dsn: str | None) -> None:
    """Load the demo bookshop (sql/schema.sql, sql/seed.sql) into a database, once.

    Both files and a marker (table pgqg.demo) go in one transaction: run again, it
    finds the marker and changes nothing.

    \b
    createdb bookshop && pgqg db init --dsn postgresql://localhost/bookshop
    """
    settings = _settings(config, dsn=dsn)
    if not settings.dsn:
        raise click.UsageError(
            "no database: pass --dsn or set PGQG_DSN / DATABASE_URL "
            "(pgqg serve loads the demo into its embedded database by itself)"
        )
    where = _describe_dsn(settings.dsn)
    try:
        loaded = load_demo(settings.dsn, settings.sql_dir)
    except DemoError as exc:
        click.echo(f"pgqg: could not load the demo into {where}; nothing was changed", err=True)
        failure = StatementFailed(
            exc.message, sqlstate=exc.sqlstate, detail=exc.detail, hint=exc.hint
        )
        for line in _error_lines(failure):
            click.echo(line, err=True)
        sys.exit(1)
    if loaded:
        click.echo(f"loaded the demo bookshop into {where}")
    else:
        click.echo(f"the demo bookshop is already in {where}; nothing changed")


# --- token -----------------------------------------------------------------------------


@main.command("token")
@_CONFIG
@click.option("--role", required=True, help="The PostgreSQL role the token names.")
@click.option("--sub", help="The sub claim: who the token is for.")
@click.option(
    "--ttl-s", type=click.IntRange(min=1), default=3600, show_default=True, help="Valid for."
)
@click.option(
    "--claim",
    "claims",
    multiple=True,
    metavar="NAME=VALUE",
    help="Another claim, a string (repeat for more).",
)
def token_command(
    config: Path | None, role: str, sub: str | None, ttl_s: int, claims: tuple[str, ...]
) -> None:
    """Print a token for development, signed with PGQG_JWT_SECRET (HS256).

    The role goes where the gateway reads it (PGQG_JWT_ROLE_CLAIM), with
    PGQG_JWT_AUDIENCE as its aud when that is set.

    \b
    export PGQG_JWT_SECRET=...        (the gateway's, at least 32 bytes)
    curl -H "Authorization: Bearer $(pgqg token --role bookshop_reader --sub ana)" ...
    """
    extra = {}
    for item in claims:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--claim")
        extra[name] = value
    try:
        click.echo(make_token(_settings(config), role=role, sub=sub, ttl_s=ttl_s, claims=extra))
    except NoSecret as exc:
        raise click.UsageError(str(exc)) from None
