"""A token's role and claims, set inside each job's own transaction (engine/_identity.py).

The gateways here log in as every test gateway does, as the tests' least-privileged
login role (`TEST_LOGIN`: no superuser, NOINHERIT, its sessions start as
`TEST_REQUEST_ROLE`), made here a member of two request roles (`READER`, `WRITER`)
but not of a third (`STRANGER`), as a PostgREST authenticator is. Where a test
needs one connection, the request after an attack lands on the very connection
the attack used.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from conftest import TEST_LOGIN, TEST_REQUEST_ROLE, ClientFactory
from psycopg import sql
from support import (
    JWT_SECRET,
    GatewayClient,
    assert_error,
    bearer,
    get_stats,
    settled_stats,
    sign,
)

from gateway._settings import DEFAULT_SQL_DIR as SQL_DIR

READER = "pgqg_test_reader"
WRITER = "pgqg_test_writer"
STRANGER = "pgqg_test_stranger"
WHO = (
    "select current_user as role, session_user as login,"
    " current_setting('request.jwt.claims', true) as claims,"
    " current_setting('request.jwt.claim.sub', true) as sub"
)


@pytest.fixture(scope="session")
def request_roles(database_dsn: str) -> None:
    """`READER`, `WRITER` and `STRANGER` (made once a session); `TEST_LOGIN` may take
    on the first two."""
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        for role in (READER, WRITER, STRANGER):
            exists = conn.execute("select 1 from pg_roles where rolname = %s", [role]).fetchone()
            if not exists:
                conn.execute(sql.SQL("create role {} nologin").format(sql.Identifier(role)))
        conn.execute(sql.SQL(f"grant {READER}, {WRITER} to {TEST_LOGIN}"))


@pytest.fixture
def gateway(gateway_factory: ClientFactory, request_roles: None) -> ClientFactory:
    """Gateways that verify tokens signed with `JWT_SECRET`."""

    async def start(**overrides: Any) -> GatewayClient:
        overrides.setdefault("jwt_secret", JWT_SECRET)
        return await gateway_factory(**overrides)

    return start


async def who(client: GatewayClient, token: str | None = None, **body: Any) -> tuple[int, Any]:
    headers = bearer(token) if token is not None else {}
    resp = await client.post("/v1/query", json={"sql": WHO, **body}, headers=headers)
    return resp.status, await resp.json()


@pytest.fixture
async def shared_table(admin: Any, table: str) -> str:
    """`table` with two rows, readable by `READER`, writable by `WRITER`."""
    await admin.execute(f"insert into {table} values (1, 'one'), (2, 'two')")
    await admin.execute(f"grant select on {table} to {READER}, {WRITER}")
    await admin.execute(f"grant insert, update, delete on {table} to {WRITER}")
    return table


@pytest.fixture
def sql_dir(tmp_path: Path) -> Path:
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "who.sql").write_text(
        "-- name: whoami\n-- Who runs it.\nSELECT current_user AS role;\n\n"
        f"-- name: readers_only\n-- For readers.\n-- roles: {READER}\n"
        "SELECT current_user AS role;\n"
    )
    return tmp_path


# --- the role and the claims -------------------------------------------------------------


async def test_a_request_runs_as_the_role_its_token_names(gateway: ClientFactory) -> None:
    client = await gateway()
    token = sign({"role": READER, "sub": "ana", "n": 1})
    status, body = await who(client, token)
    assert status == 200, body
    row = body["rows"][0]
    assert (row["role"], row["login"], row["sub"]) == (READER, TEST_LOGIN, "ana")
    assert json.loads(row["claims"]) == {"role": READER, "sub": "ana", "n": 1, **_exp(token)}


async def test_neon_sql_goes_by_the_token_too(gateway: ClientFactory) -> None:
    # the Neon driver's authToken arrives as a Bearer token on POST /sql
    client = await gateway()
    body = {"query": "select current_user::text AS role", "params": []}
    refused = await client.post("/sql", json=body)
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post("/sql", json=body, headers=bearer(sign({"role": READER})))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["rows"] == [{"role": READER}]


def _exp(token: str) -> dict[str, Any]:
    import jwt

    return {"exp": jwt.decode(token, options={"verify_signature": False})["exp"]}


async def test_claims_reach_sql_exactly_whatever_they_hold(gateway: ClientFactory) -> None:
    """The role and claims are quoted into the SET LOCAL statements: quotes,
    backslashes and escapes in them arrive as they were, never as SQL."""
    client = await gateway()
    hostile = "a'b\\'c\\n\"d\" é ✓ '; select 1; --"
    token = sign({"role": READER, "sub": hostile, "Note": hostile, "x": {"k": hostile}})
    status, body = await who(client, token)
    assert status == 200, body
    (row,) = body["rows"]
    assert (row["role"], row["sub"]) == (READER, hostile)
    assert json.loads(row["claims"])["x"] == {"k": hostile}
    resp = await client.post(
        "/v1/query",
        json={"sql": "select current_setting('request.jwt.claim.Note') as note"},
        headers=bearer(token),
    )
    assert (resp.status, (await resp.json())["rows"]) == (200, [{"note": hostile}])


async def test_a_request_without_a_token_runs_as_the_anonymous_role(
    gateway: ClientFactory,
) -> None:
    client = await gateway(anon_role=READER)
    status, body = await who(client)
    assert status == 200, body
    row = body["rows"][0]
    assert (row["role"], row["claims"]) == (READER, "{}")
    assert row["sub"] in (None, "")


async def test_the_token_role_obeys_postgresql_grants(
    gateway: ClientFactory, shared_table: str
) -> None:
    client = await gateway(raw_sql="read-write")
    insert = {"sql": f"insert into {shared_table} values (3, 'three')"}
    refused = await client.post("/v1/query", json=insert, headers=bearer(sign({"role": READER})))
    assert refused.status == 403
    assert_error(await refused.json(), "query_error", "42501")
    done = await client.post("/v1/query", json=insert, headers=bearer(sign({"role": WRITER})))
    assert done.status == 200, await done.text()


@pytest.mark.parametrize(
    ("role", "sqlstate"), [(STRANGER, "42501"), ("pgqg_test_no_such_role", "22023")]
)
async def test_a_role_the_login_role_cannot_take_is_403_forbidden_role(
    gateway: ClientFactory, sql_dir: Path, role: str, sqlstate: str
) -> None:
    client = await gateway(pool_size=1, sql_dir=sql_dir)
    token = bearer(sign({"role": role}))
    requests = [("/v1/query", {"sql": WHO})]
    requests += [(f"/v1/queries/whoami?format={fmt}", {}) for fmt in ("json", "ndjson", "csv")]
    for path, body in requests:
        resp = await client.post(path, json=body, headers=token)
        assert resp.status == 403, await resp.text()
        error = await resp.json()
        assert_error(error, "forbidden_role", sqlstate)
        assert role in error["error"]["message"]
    # the connection the refusal used serves the next request, as its own role
    status, body = await who(client, sign({"role": WRITER}))
    assert status == 200 and body["rows"][0]["role"] == WRITER


async def test_a_statement_the_role_may_not_run_is_not_forbidden_role(
    gateway: ClientFactory,
) -> None:
    """Only the role step maps 42501 to forbidden_role: a refused statement stays a
    query_error with PostgreSQL's SQLSTATE."""
    client = await gateway()
    resp = await client.post(
        "/v1/query",
        json={"sql": "select pg_catalog.pg_read_file('postgresql.conf')"},
        headers=bearer(sign({"role": READER})),
    )
    assert resp.status == 403
    assert_error(await resp.json(), "query_error", "42501")


# --- nothing outlives the job ------------------------------------------------------------


async def test_nothing_of_a_token_outlives_its_transaction(gateway: ClientFactory) -> None:
    client = await gateway(pool_size=1, anon_role=READER)
    status, body = await who(client, sign({"role": WRITER, "sub": "ana"}))
    assert status == 200 and body["rows"][0]["sub"] == "ana"
    status, body = await who(client)
    row = body["rows"][0]
    assert (row["role"], row["claims"], row["sub"]) == (READER, "{}", "")


async def test_two_hundred_interleaved_requests_of_two_roles_on_two_connections(
    gateway: ClientFactory,
) -> None:
    """Pipelined in batches on 2 connections, each request answers with its own
    role and sub: no neighbour's leaks into it."""
    client = await gateway(pool_size=2)
    tokens = [sign({"role": (READER, WRITER)[i % 2], "sub": f"user{i}"}) for i in range(200)]
    answers = await asyncio.gather(*(who(client, token) for token in tokens))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        row = body["rows"][0]
        assert (row["role"], row["sub"]) == ((READER, WRITER)[i % 2], f"user{i}")
        assert json.loads(row["claims"])["sub"] == f"user{i}"
    stats = await settled_stats(client)
    assert stats["jobs_per_batch"] > 1  # neighbours shared round trips


async def test_each_statement_of_a_transaction_runs_as_the_role(
    gateway: ClientFactory, shared_table: str
) -> None:
    client = await gateway(raw_sql="read-write")
    body = {
        "statements": [
            {"sql": f"insert into {shared_table} values (3, current_user)"},
            {"sql": f"select v from {shared_table} where id = 3"},
            {"sql": "select current_setting('request.jwt.claim.sub') as sub"},
        ]
    }
    token = sign({"role": WRITER, "sub": "ana"})
    resp = await client.post("/v1/transaction", json=body, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    results = (await resp.json())["results"]
    assert results[1]["rows"] == [{"v": WRITER}]
    assert results[2]["rows"] == [{"sub": "ana"}]


async def test_a_named_query_streams_as_the_role(gateway: ClientFactory, sql_dir: Path) -> None:
    client = await gateway(sql_dir=sql_dir)
    token = bearer(sign({"role": WRITER}))
    resp = await client.get("/v1/queries/whoami?format=ndjson", headers=token)
    assert resp.status == 200, await resp.text()
    assert [json.loads(line) for line in (await resp.text()).splitlines()] == [{"role": WRITER}]
    resp = await client.get("/v1/queries/whoami?format=csv", headers=token)
    assert (await resp.text()).splitlines() == ["role", WRITER]


async def test_a_stream_is_described_as_the_role(
    gateway: ClientFactory, admin: Any, tmp_path: Path
) -> None:
    """Its statement is parsed as the token's role, which may use a schema the login
    role may not."""
    schema = f"s_{uuid.uuid4().hex[:10]}"
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "x.sql").write_text(f"-- name: x\nSELECT x FROM {schema}.t;\n")
    await admin.execute(f"create schema {schema}")
    try:
        await admin.execute(f"create table {schema}.t as select 1 as x")
        await admin.execute(f"grant usage on schema {schema} to {WRITER}")
        await admin.execute(f"grant select on {schema}.t to {WRITER}")
        client = await gateway(sql_dir=tmp_path)
        for fmt in ("json", "csv"):
            resp = await client.get(
                f"/v1/queries/x?format={fmt}", headers=bearer(sign({"role": WRITER}))
            )
            assert resp.status == 200, await resp.text()
    finally:
        await admin.execute(f"drop schema {schema} cascade")


async def test_raw_sql_does_not_stream_with_a_role(
    gateway: ClientFactory, admin: Any, table: str
) -> None:
    """A raw statement could take on another role of the login role's halfway (here
    the login role's own request role, which may read every table) and run SQL as it
    (ts_stat runs a query of its own): buffered, its answer waits for its role check;
    streamed, rows would go out first. So it does not stream with a role: 406."""
    await admin.execute(f"insert into {table} values (1, 'topsecret')")
    client = await gateway(pool_size=1)
    switch = f"pg_catalog.set_config('role', '{TEST_REQUEST_ROLE}', true)"
    escape = (
        f"select w.word from pg_catalog.ts_stat('select to_tsvector(''simple'', v) from {table}"
        f" where ' || ({switch} is not null)::text) w"
    )
    token = bearer(sign({"role": READER}))
    for fmt in ("ndjson", "csv"):
        resp = await client.post(f"/v1/query?format={fmt}", json={"sql": escape}, headers=token)
        text = await resp.text()
        assert resp.status == 406, text
        assert "topsecret" not in text
        assert_error(json.loads(text), "not_acceptable")
    resp = await client.post("/v1/query", json={"sql": escape}, headers=token)
    text = await resp.text()
    assert resp.status == 403 and "topsecret" not in text
    assert_error(json.loads(text), "query_error", "42501")  # the role check's refusal


async def test_vacuum_is_refused_with_a_role(gateway: ClientFactory, shared_table: str) -> None:
    """VACUUM cannot run in a transaction block, and a token's role is taken on only
    inside one: it is refused, not run as the login role."""
    client = await gateway(raw_sql="read-write")
    resp = await client.post(
        "/v1/query", json={"sql": f"vacuum {shared_table}"}, headers=bearer(sign({"role": WRITER}))
    )
    assert resp.status == 400
    assert_error(await resp.json(), "query_error", "25001")


# --- named queries and raw SQL ---------------------------------------------------------------


async def test_named_queries_run_as_the_role_and_obey_their_roles_line(
    gateway: ClientFactory, sql_dir: Path
) -> None:
    client = await gateway(sql_dir=sql_dir, anon_role=WRITER)
    reader, writer = bearer(sign({"role": READER})), bearer(sign({"role": WRITER}))
    for method in ("GET", "POST"):
        body = None if method == "GET" else {"params": {}}
        resp = await client.request(method, "/v1/queries/whoami", json=body, headers=writer)
        assert (await resp.json())["rows"] == [{"role": WRITER}]
        resp = await client.request(method, "/v1/queries/readers_only", json=body, headers=reader)
        assert (await resp.json())["rows"] == [{"role": READER}]
        for headers in (writer, {}):  # a token's role, and the anonymous one
            resp = await client.request(
                method, "/v1/queries/readers_only", json=body, headers=headers
            )
            assert resp.status == 403
            assert_error(await resp.json(), "forbidden_role")
    listed = await (await client.get("/v1/queries")).json()
    assert {q["name"]: q["roles"] for q in listed["queries"]} == {
        "whoami": None,
        "readers_only": [READER],
    }


async def test_a_roles_line_without_identity_refuses_everyone(
    gateway_factory: ClientFactory, sql_dir: Path
) -> None:
    client = await gateway_factory(sql_dir=sql_dir)
    assert (await client.get("/v1/queries/whoami")).status == 200
    resp = await client.get("/v1/queries/readers_only")
    assert resp.status == 403
    assert_error(await resp.json(), "forbidden_role")


async def test_raw_sql_may_be_limited_to_roles(gateway: ClientFactory) -> None:
    client = await gateway(raw_sql_roles=WRITER, anon_role=READER)
    status, body = await who(client, sign({"role": WRITER}))
    assert status == 200, body
    for headers in (bearer(sign({"role": READER})), {}):
        for path, body in (
            ("/v1/query", {"sql": "select 1"}),
            ("/v1/transaction", {"statements": [{"sql": "select 1"}], "read_only": True}),
        ):
            resp = await client.post(path, json=body, headers=headers)
            assert resp.status == 403
            assert_error(await resp.json(), "forbidden_role")
    stats = await get_stats(client)
    assert stats["queue"]["depth"] == 0


# --- the demo: two roles and a row-level security policy ------------------------------------


@pytest.fixture(scope="module")
def bookshop_dsn(database_dsn: str) -> Iterator[str]:
    """A database of this module's own holding the demo; `TEST_LOGIN` may take its roles."""
    name = f"pgqg_identity_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    dsn = psycopg.conninfo.make_conninfo(database_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for file in ("schema.sql", "seed.sql"):
                conn.execute((SQL_DIR / file).read_text())
            conn.execute(f"grant bookshop_reader, bookshop_reviewer to {TEST_LOGIN}")
        yield dsn
    finally:
        with psycopg.connect(database_dsn, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture
async def bookshop(gateway: ClientFactory, bookshop_dsn: str) -> GatewayClient:
    return await gateway(dsn=bookshop_dsn, anon_role="bookshop_reader")


async def _reviews(client: GatewayClient, book: int, token: str | None) -> list[Any]:
    headers = bearer(token) if token else {}
    resp = await client.get(f"/v1/queries/reviews_for_book?book_id={book}&lim=10", headers=headers)
    assert resp.status == 200, await resp.text()
    rows: list[Any] = (await resp.json())["rows"]
    return rows


async def test_rls_readers_see_published_reviews_and_reviewers_their_drafts(
    bookshop: GatewayClient,
) -> None:
    book = 1150  # books 1101-1200 have no reviews in the seed
    ana = sign({"role": "bookshop_reviewer", "sub": "ana"})
    bob = sign({"role": "bookshop_reviewer", "sub": "bob"})
    reader = sign({"role": "bookshop_reader", "sub": "ana"})
    draft = {"params": {"book_id": book, "rating": 4, "body": "Draft: good so far."}}
    resp = await bookshop.post("/v1/queries/draft_review", json=draft, headers=bearer(ana))
    assert resp.status == 200, await resp.text()
    written = (await resp.json())["rows"][0]
    assert (written["reviewer"], written["published"]) == ("ana", False)
    assert [r["id"] for r in await _reviews(bookshop, book, ana)] == [written["id"]]
    for other in (bob, reader, None):  # another reviewer, a reader, nobody
        assert await _reviews(bookshop, book, other) == []
    # published reviews are there for everyone; readers may not write drafts
    assert len(await _reviews(bookshop, 7, None)) == len(await _reviews(bookshop, 7, ana)) > 0
    resp = await bookshop.post("/v1/queries/draft_review", json=draft, headers=bearer(reader))
    assert resp.status == 403
    assert_error(await resp.json(), "forbidden_role")


async def test_rls_a_reviewer_cannot_write_in_another_name(
    gateway: ClientFactory, bookshop_dsn: str
) -> None:
    client = await gateway(dsn=bookshop_dsn, raw_sql="read-write")
    ana = bearer(sign({"role": "bookshop_reviewer", "sub": "ana"}))
    forged = {
        "sql": "insert into review (book_id, rating, reviewer, body, published)"
        " values (1160, 1, 'bob', 'forged', false)"
    }
    resp = await client.post("/v1/query", json=forged, headers=ana)
    assert resp.status == 403
    assert_error(await resp.json(), "query_error", "42501")  # new row violates the policy
    mine = {"sql": forged["sql"].replace("'bob'", "'ana'")}
    assert (await client.post("/v1/query", json=mine, headers=ana)).status == 200


# --- a request cannot leave its token's role ------------------------------------------------

ESCAPES = [
    "reset role",
    f"set role {READER}",  # another role the login role may take on
    "set role none",
    "set local role none",
    f"select pg_catalog.set_config('role', '{READER}', false)",
    f"select pg_catalog.set_config('role', '{TEST_REQUEST_ROLE}', true)",
    "set session authorization default",
]


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("mode", ["read-only", "read-write"])
async def test_a_request_cannot_leave_the_role_of_its_token(
    gateway: ClientFactory, escape: str, mode: str
) -> None:
    """The role check after each raw statement compares with the token's role: the
    request is refused before any result is returned and before it commits, and the
    connection's next request runs as its own token's role."""
    client = await gateway(pool_size=1, raw_sql=mode)
    writer = bearer(sign({"role": WRITER}))
    resp = await client.post("/v1/query", json={"sql": escape}, headers=writer)
    assert resp.status == 403, await resp.text()
    assert_error(await resp.json(), "query_error", "42501")
    statements = [{"sql": escape}, {"sql": "select current_user as role"}]
    resp = await client.post(
        "/v1/transaction",
        json={"statements": statements, "read_only": mode == "read-only"},
        headers=writer,
    )
    assert resp.status == 403, await resp.text()
    assert_error(await resp.json(), "query_error", "42501")
    for role in (READER, WRITER):
        status, body = await who(client, sign({"role": role}))
        assert status == 200 and body["rows"][0]["role"] == role


# --- live events: who may listen -------------------------------------------------------------


async def test_a_token_s_role_picks_the_channels_it_may_listen_to(gateway: ClientFactory) -> None:
    """``PGQG_LISTEN_CHANNELS`` names roles: a token's (verified), or ``anon`` for a
    request without one."""
    client = await gateway(listen_channels={"anon": ["news"], READER: ["shop_*"]})
    reader = bearer(sign({"role": READER}))
    resp = await client.get("/v1/listen/shop_orders", headers=reader)
    assert resp.status == 200
    resp.close()
    resp = await client.get("/v1/listen/shop_orders")
    assert resp.status == 403
    assert "anonymous requests may not listen" in (await resp.json())["error"]["message"]
    resp = await client.get("/v1/listen/news", headers=reader)
    assert resp.status == 403
    assert f"role '{READER}' may not listen" in (await resp.json())["error"]["message"]
    resp = await client.get("/v1/listen/shop_orders", headers=bearer("not.a.token"))
    assert resp.status == 401
    assert_error(await resp.json(), "invalid_token")
