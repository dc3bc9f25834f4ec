"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every
``PGQG_*`` variable they set is a real setting with a valid value, every command they
run is a ``pgqg`` command that parses, the services start in the right order, and the
gateway's least-privileged login role (made by the postgres service's init script) is
one the gateway serves raw SQL as, tried on an embedded cluster set up as the image
sets up its database."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
import yaml
from click.testing import CliRunner
from conftest import ClientFactory, EmbeddedFactory
from support import as_made_before_login_roles, query

from gateway._settings import DEFAULT_SQL_DIR, Settings, load_settings
from gateway.cli._commands import main
from gateway.cli._demo import load_demo
from gateway.embedded._roles import roles_sql

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
BUILT = {name: svc for name, svc in SERVICES.items() if svc.get("build")}
#: run by the postgres image when it creates the database: the gateway's login role
INIT_SQL = REPO / "docker" / "postgres-initdb" / "10-pgqg-roles.sql"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "- KEY=value" form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def check_settings(env: dict[str, str], where: str) -> None:
    """Every PGQG_* name is a setting, and the values load together."""
    overrides = {}
    for name, value in env.items():
        if not name.startswith("PGQG_"):
            continue
        field = name.removeprefix("PGQG_").lower()
        assert field in Settings.model_fields, f"{where}: {name} is not a pgqg setting"
        overrides[field] = value
    load_settings(**overrides)  # raises ConfigError naming a bad value


def check_command(argv: list[str], where: str) -> None:
    """A pgqg command whose subcommand exists and whose options parse."""
    assert argv and argv[0] == "pgqg", f"{where}: {argv} is not a pgqg command"
    result = CliRunner().invoke(main, [*argv[1:], "--help"], prog_name="pgqg")
    assert result.exit_code == 0, f"{where}: {shlex.join(argv)}: {result.output}"
    assert result.stdout.startswith(f"Usage: pgqg {' '.join(argv[1:3])}".rstrip()), result.stdout


def test_compose_has_postgres_and_the_gateway() -> None:
    postgres = SERVICES["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    assert postgres["healthcheck"]["test"]
    gateway = SERVICES["gateway"]
    assert gateway["build"] in (".", {"context": "."})
    assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert gateway["ports"], "the gateway's port is published"


@pytest.mark.parametrize("name", sorted(BUILT))
def test_compose_variables_are_settings(name: str) -> None:
    env = dockerfile_env() | environment(BUILT[name])
    assert any(k.startswith("PGQG_") for k in environment(BUILT[name]))
    check_settings(env, f"docker-compose.yml service {name}")


@pytest.mark.parametrize("name", sorted(BUILT))
def test_compose_commands_exist(name: str) -> None:
    command = BUILT[name].get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    check_command(argv, f"docker-compose.yml service {name}")


def test_compose_dsn_matches_the_postgres_service() -> None:
    # the demo is loaded by the database's owner; the gateway logs in as the
    # least-privileged role the init script makes
    pg_env = environment(SERVICES["postgres"])
    owner = (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
    for name, service in BUILT.items():
        dsn = environment(service)["PGQG_DSN"]
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        assert info["host"] == "postgres", name
        assert info["dbname"] == pg_env["POSTGRES_DB"], name
        login = (info["user"], info["password"])
        assert login == (owner if name == "demo" else gateway_login()), name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name


def gateway_login() -> tuple[str, str]:
    """The login role and password the init script makes."""
    found = re.search(r"CREATE ROLE (\w+) LOGIN[^;]* PASSWORD '([^']*)'", INIT_SQL.read_text())
    assert found, f"{INIT_SQL} makes no login role"
    return found.group(1), found.group(2)


def sql_words(text: str) -> list[str]:
    """SQL's words, without comments, the quotes around names, or layout."""
    return " ".join(line.split("--", 1)[0] for line in text.splitlines()).replace('"', "").split()


def test_the_init_script_makes_the_roles_the_embedded_server_makes() -> None:
    password = gateway_login()[1]
    assert sql_words(INIT_SQL.read_text()) == sql_words(roles_sql(password=password).as_string())


def test_the_docs_give_the_init_scripts_sql() -> None:
    page = (REPO / "docs" / "security.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```sql\n")[1:]]
    roles = [b for b in blocks if b.startswith("CREATE ROLE")]
    assert [sql_words(b) for b in roles] == [sql_words(INIT_SQL.read_text())]


def test_the_init_script_is_run_when_the_database_is_created() -> None:
    volumes = SERVICES["postgres"]["volumes"]
    assert f"./{INIT_SQL.parent.relative_to(REPO)}:/docker-entrypoint-initdb.d:ro" in volumes


async def test_the_init_script_makes_a_role_the_gateway_serves_raw_sql_as(
    embedded_factory: EmbeddedFactory, gateway_factory: ClientFactory
) -> None:
    # as the postgres image does it: POSTGRES_USER, a superuser, owns POSTGRES_DB and
    # runs the script there; the demo service then loads the demo as that user
    pg_env = environment(SERVICES["postgres"])
    owner, password, dbname = (
        pg_env[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
    )
    pg = embedded_factory()
    as_made_before_login_roles(pg)  # the embedded server's own roles have these names
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {owner} LOGIN SUPERUSER PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {dbname} OWNER {owner}")
    owner_dsn = psycopg.conninfo.make_conninfo(pg.dsn, user=owner, password=password, dbname=dbname)
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        conn.execute(INIT_SQL.read_bytes())
    load_demo(owner_dsn, DEFAULT_SQL_DIR)

    user, secret = gateway_login()
    gateway_dsn = psycopg.conninfo.make_conninfo(owner_dsn, user=user, password=secret)
    client = await gateway_factory(dsn=gateway_dsn)  # the start-up check lets it serve
    resp = await client.get("/v1/queries/book_by_id", params={"id": "7"})
    assert resp.status == 200
    assert (await resp.json())["rows"][0]["id"] == 7
    status, body = await query(client, "select pg_read_file('/etc/hostname')")
    assert (status, body["error"]["sqlstate"]) == (403, "42501")
    status, body = await query(client, "select count(*) AS n from pgqg.demo")
    assert (status, body["error"]["sqlstate"]) == (403, "42501")  # the owner's bookkeeping
    rw = await gateway_factory(dsn=gateway_dsn, raw_sql="read-write")
    status, body = await query(rw, "update book set price = price where id = 7")
    assert (status, body["row_count"]) == (200, 1)
    status, body = await query(rw, "drop table review")
    assert (status, body["error"]["sqlstate"]) == (403, "42501")


def test_compose_port_is_the_gateways() -> None:
    gateway = SERVICES["gateway"]
    port = (dockerfile_env() | environment(gateway))["PGQG_PORT"]
    published = [str(p).rsplit(":", 1)[-1] for p in gateway["ports"]]
    assert port in published
    host = (dockerfile_env() | environment(gateway))["PGQG_HOST"]
    assert host == "0.0.0.0", "inside a container the gateway must listen on every interface"


def test_the_demo_is_loaded_before_the_gateway_starts() -> None:
    demo = [n for n, s in BUILT.items() if (s.get("command") or [])[:3] == ["pgqg", "db", "init"]]
    assert demo, "a service runs pgqg db init"
    assert SERVICES["gateway"]["depends_on"][demo[0]] == {
        "condition": "service_completed_successfully"
    }


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in instructions:
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args))
    build, runtime = stages
    # the wheel is built where a C compiler is (mypyc), and installed in the slim image
    assert build[0] == ("FROM", "python:3.11 AS build")
    build_copied = {
        name for instruction, args in build if instruction == "COPY" for name in args.split()[:-1]
    }
    assert {"pyproject.toml", "setup.py", "gateway"} <= build_copied
    assert any(i == "RUN" and "pip wheel" in args and args.endswith(" .") for i, args in build)
    assert runtime[0] == ("FROM", "python:3.11-slim")
    assert any(i == "RUN" and "pip install /wheels/" in args for i, args in runtime)
    check_settings(dockerfile_env(), "Dockerfile")
    cmd = [args for instruction, args in runtime if instruction == "CMD"][-1]
    check_command(json.loads(cmd), "Dockerfile CMD")
    # a non-editable install has no sql/ next to the package: the image must say where
    assert dockerfile_env()["PGQG_SQL_DIR"] == "/app/sql"
    copied = [args.split()[0] for instruction, args in runtime if instruction == "COPY"]
    assert "sql" in copied
