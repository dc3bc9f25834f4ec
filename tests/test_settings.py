"""Settings: defaults, TOML, environment, overrides; errors name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import ConfigError, load_settings
from gateway._settings import describe_settings


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
