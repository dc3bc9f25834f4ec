"""The baselines pgqg is measured against: small aiohttp apps, one process each.

Each one answers pgqg's contract for a query, ``POST /v1/query`` with the JSON body
``{"sql": "...", "params": [...]}`` (PostgreSQL's ``$1`` placeholders), with
``{"rows": [{column: value, ...}], "row_count": n}``; each is the obvious version a
competent engineer would write, on the same footing as pgqg: uvloop when installed,
orjson for JSON both ways, no access log, one process, the same pool size.

``--kind``:

* ``connect``: a new psycopg ``AsyncConnection`` per request (TCP, password
  authentication, a backend fork each time): the problem without a pool.
* ``psycopg_pool``: ``psycopg_pool.AsyncConnectionPool`` of ``--pool-size``
  connections, ``async with pool.connection()`` + execute + fetchall: the obvious
  hand-written gateway. Autocommit, as a read gateway would set it (otherwise psycopg
  adds a BEGIN and a COMMIT round trip per request).
* ``asyncpg``: an ``asyncpg`` pool of ``--pool-size`` connections, ``pool.fetch``:
  what people pick for speed. Defaults kept, so asyncpg prepares and caches the
  statement, and resets the connection when it goes back to the pool.
* ``asyncpg_noreset``: the same with ``create_pool(reset=...)`` a no-op, so releasing
  a connection costs no round trip; not the obvious version (a session setting, a
  LISTEN or an advisory lock then outlives its request), measured for information.
* ``static``: a fixed row, no database; the request body is still read and parsed,
  so this is the ceiling of one Python process serving this contract.

Run: ``python bench/baselines.py --kind asyncpg --dsn DSN --port 8101 --pool-size 8``.
It prints ``ready`` on stdout once it serves, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `gateway`

from gateway.web._server import install_uvloop  # pgqg's own event loop choice

KINDS = ("connect", "psycopg_pool", "asyncpg", "asyncpg_noreset", "static")

Handler = Callable[[web.Request], Awaitable[web.Response]]
Rows = list[dict[str, Any]]
Query = Callable[[str, list[Any]], Awaitable[Rows]]

#: what the static baseline answers: a row of the point select's shape
STATIC_ROW: dict[str, Any] = {"aid": 1, "abalance": 0}


def _answer(rows: list[dict[str, Any]]) -> web.Response:
    return web.Response(
        body=orjson.dumps({"rows": rows, "row_count": len(rows)}),
        content_type="application/json",
    )


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": {"message": message}}),
        status=status,
        content_type="application/json",
    )


async def _read_query(request: web.Request) -> tuple[str, list[Any]]:
    body = orjson.loads(await request.read())
    return body["sql"], body.get("params") or []


def _query_handler(run: Query) -> Handler:
    """POST /v1/query: parse the body, run the statement, answer its rows."""

    async def handler(request: web.Request) -> web.Response:
        try:
            sql, params = await _read_query(request)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"bad request: {exc}")
        try:
            rows = await run(sql, params)
        except Exception as exc:  # a database error: answer it, keep serving
            return _error(500, f"{type(exc).__name__}: {exc}")
        return _answer(rows)

    return handler


# --- the four kinds ------------------------------------------------------------------


def connect_app(dsn: str, pool_size: int) -> web.Application:
    """A new connection per request: what the problem looks like without a pool."""
    from psycopg import AsyncConnection, AsyncRawCursor
    from psycopg.rows import dict_row

    async def run(sql: str, params: list[Any]) -> list[dict[str, Any]]:
        conn = await AsyncConnection.connect(
            dsn, autocommit=True, row_factory=dict_row, cursor_factory=AsyncRawCursor
        )
        async with conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    app = web.Application()
    app.router.add_post("/v1/query", _query_handler(run))
    return app


def _pooled_app(
    open_pool: Callable[[], Awaitable[Any]], fetch: Callable[[Any, str, list[Any]], Awaitable[Rows]]
) -> web.Application:
    """An app whose pool is opened by `open_pool` at start-up (closed at cleanup)
    and whose handler runs each query with ``fetch(pool, sql, params)``."""
    holder: dict[str, Any] = {}

    async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
        holder["pool"] = await open_pool()
        try:
            yield
        finally:
            await holder["pool"].close()

    async def run(sql: str, params: list[Any]) -> Rows:
        return await fetch(holder["pool"], sql, params)

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/v1/query", _query_handler(run))
    return app


def psycopg_pool_app(dsn: str, pool_size: int) -> web.Application:
    """The obvious hand-written gateway: psycopg_pool, one connection per request."""
    from psycopg import AsyncConnection, AsyncRawCursor
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    async def open_pool() -> AsyncConnectionPool[AsyncConnection[dict[str, Any]]]:
        pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            dsn,
            min_size=pool_size,
            max_size=pool_size,
            open=False,
            connection_class=AsyncConnection,
            # $1 placeholders as sent by the client (RawCursor), rows as dicts
            kwargs={"autocommit": True, "row_factory": dict_row, "cursor_factory": AsyncRawCursor},
        )
        await pool.open(wait=True)
        return pool

    async def fetch(pool: Any, sql: str, params: list[Any]) -> Rows:
        async with pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()  # type: ignore[no-any-return]

    return _pooled_app(open_pool, fetch)


def asyncpg_app(dsn: str, pool_size: int, *, reset: bool = True) -> web.Application:
    """What people pick for speed: an asyncpg pool, ``pool.fetch``.

    With `reset` false, a connection goes back to the pool without asyncpg's reset
    query (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``, one
    more round trip per request): faster, but session state may leak between requests.
    """
    import asyncpg  # type: ignore[import-untyped]

    async def no_reset(conn: Any) -> None:
        return None

    async def open_pool() -> Any:
        return await asyncpg.create_pool(
            dsn, min_size=pool_size, max_size=pool_size, reset=None if reset else no_reset
        )

    async def fetch(pool: Any, sql: str, params: list[Any]) -> Rows:
        return [dict(r) for r in await pool.fetch(sql, *params)]

    return _pooled_app(open_pool, fetch)


def asyncpg_noreset_app(dsn: str, pool_size: int) -> web.Application:
    """The asyncpg baseline without the reset query on release (not the default)."""
    return asyncpg_app(dsn, pool_size, reset=False)


def static_app(dsn: str, pool_size: int) -> web.Application:
    """A fixed row without touching the database: the ceiling of one Python process."""

    async def run(sql: str, params: list[Any]) -> list[dict[str, Any]]:
        return [STATIC_ROW]

    app = web.Application()
    app.router.add_post("/v1/query", _query_handler(run))
    return app


FACTORIES: dict[str, Callable[[str, int], web.Application]] = {
    "connect": connect_app,
    "psycopg_pool": psycopg_pool_app,
    "asyncpg": asyncpg_app,
    "asyncpg_noreset": asyncpg_noreset_app,
    "static": static_app,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--dsn", default="", help="PostgreSQL DSN (not needed for static)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.kind != "static" and not args.dsn:
        parser.error(f"--dsn is needed for --kind {args.kind}")
    install_uvloop()
    app = FACTORIES[args.kind](args.dsn, args.pool_size)

    async def announce(_app: web.Application) -> None:
        print("ready", flush=True)

    app.on_startup.append(announce)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
