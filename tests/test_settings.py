"""Settings: defaults, TOML, environment, overrides; errors name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import ConfigError, load_settings
from gateway._settings import ConfigFileError, describe_settings, unknown_variables


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, _, _ in describe_settings():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    s = load_settings()
    assert (s.host, s.port, s.raw_sql, s.max_rows) == ("127.0.0.1", 8080, "read-only", 10000)
    assert s.dsn is None


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "pgqg.toml"
    toml.write_text('port = 7000\npool_size = 3\nraw_sql = "off"\n')
    monkeypatch.setenv("PGQG_POOL_SIZE", "5")
    s = load_settings(toml, raw_sql="read-write")
    assert s.port == 7000  # from the file
    assert s.pool_size == 5  # the environment beats the file
    assert s.raw_sql == "read-write"  # the command line beats both


def test_database_url_and_pgqg_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGQG_DSN", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://a/b")
    assert load_settings().dsn == "postgresql://a/b"
    monkeypatch.setenv("PGQG_DSN", "postgresql://c/d")
    assert load_settings().dsn == "postgresql://c/d"


def test_errors_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQG_PORT", "eighty")
    with pytest.raises(ConfigError, match="PGQG_PORT"):
        load_settings()
    monkeypatch.delenv("PGQG_PORT")
    with pytest.raises(ConfigError, match="PGQG_RAW_SQL"):
        load_settings(raw_sql="sometimes")
    toml = tmp_path / "bad.toml"
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        load_settings(toml)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    toml = tmp_path / "pgqg.toml"
    toml.write_text("pool_size = 2\nport = \n")
    with pytest.raises(ConfigFileError) as caught:
        load_settings(toml)
    assert str(caught.value) == f"{toml}: not valid TOML: Invalid value (at line 2, column 8)"
    toml.write_bytes(b"port = '\xff'\n")
    with pytest.raises(ConfigFileError, match=f"^{toml}: not valid TOML: "):
        load_settings(toml)


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("pool-size", "pool_size"),
        ("poolsize", "pool_size"),
        ("statement_timeout", "statement_timeout_ms"),
    ],
)
def test_an_unknown_toml_key_names_the_setting_it_probably_meant(
    tmp_path: Path, key: str, meant: str
) -> None:
    toml = tmp_path / "pgqg.toml"
    toml.write_text(f"{key} = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(toml)
    assert str(caught.value) == (
        f"invalid settings: unknown setting {key!r} in {toml} (did you mean {meant!r}?)"
    )
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'colour' in .*pgqg\.toml$"):
        load_settings(toml)


def test_unknown_pgqg_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "PGQG_POOLSIZE": "3",  # a typo
        "PGQG_LOG_LVL": "debug",
        "PGQG_FROBNICATE": "1",  # nothing close
        "PGQG_POOL_SIZE": "3",  # settings, in any case, are fine
        "pgqg_port": "1",
        "PGQG_COMPILE": "0",  # read by the build and the tests, not settings
        "PGQG_TEST_DSN": "postgresql://",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == [
        "PGQG_FROBNICATE is not a setting and is ignored",
        "PGQG_LOG_LVL is not a setting and is ignored; did you mean PGQG_LOG_LEVEL?",
        "PGQG_POOLSIZE is not a setting and is ignored; did you mean PGQG_POOL_SIZE?",
    ]


def test_every_setting_has_a_help_line() -> None:
    rows = describe_settings()
    assert len(rows) >= 15
    assert all(name.startswith("PGQG_") and help_ for name, _, help_ in rows)


def test_docs_list_every_setting() -> None:
    page = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    table = page.split("<!-- settings-table")[1].split("<!-- /settings-table -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    settings = describe_settings()
    assert len(rows) == len(settings)
    for name, default, help_ in settings:
        shown = default if default == "(unset)" else f"`{default}`"
        key = name.removeprefix("PGQG_").lower()
        assert f"| `{key}` | `{name}` | {shown} | {help_} |" in table, name
