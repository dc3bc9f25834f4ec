"""The pool's connections (gateway/engine/_pool.py): how each one is set up."""

from __future__ import annotations

from gateway import load_settings
from gateway.engine._pool import make_pool


async def test_every_connection_has_keepalives_and_a_tcp_user_timeout(database_dsn: str) -> None:
    settings = load_settings(
        dsn=database_dsn,
        pool_size=1,
        keepalives_idle_s=7,
        keepalives_interval_s=2,
        keepalives_count=4,
        tcp_user_timeout_ms=9000,
    )
    pool = make_pool(settings, database_dsn)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            options = {o.keyword: o.val for o in conn.pgconn.info}
    finally:
        await pool.close()
    assert options[b"keepalives"] == b"1"
    assert options[b"keepalives_idle"] == b"7"
    assert options[b"keepalives_interval"] == b"2"
    assert options[b"keepalives_count"] == b"4"
    assert options[b"tcp_user_timeout"] == b"9000"
