"""The gateway's settings: one object, loaded once at start (DESIGN §5).

Sources, later wins: defaults, a TOML file, ``PGQG_*`` environment variables
(plus ``DATABASE_URL``), then values passed in (the command line). Nothing else
in the package reads ``os.environ``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import platformdirs
from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

RawSqlMode = Literal["off", "read-only", "read-write"]

#: the repository's ``sql/`` folder, next to the package
DEFAULT_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

#: a channel name /v1/listen takes: PostgreSQL's unquoted identifier syntax in ASCII, at
#: most 63 bytes (NAMEDATALEN - 1), matched as written (as pg_notify() takes it)
CHANNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
#: an entry of listen_channels: a channel name, a prefix and ``*``, or ``*`` alone
_CHANNEL_RULE = re.compile(rf"\*|{CHANNEL_NAME.pattern}\*?")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting."""


class Settings(BaseSettings):
    """Every setting of pgqg, with its default and what it means."""

    model_config = SettingsConfigDict(
        env_prefix="PGQG_",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        validate_default=True,
    )

    #: the TOML file `load_settings` was given, read between the defaults and the environment
    config_file: ClassVar[Path | None] = None

    dsn: str | None = Field(
        None,
        validation_alias=AliasChoices("dsn", "PGQG_DSN", "DATABASE_URL"),
        description="PostgreSQL connection string; unset means the embedded server.",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the HTTP server listens on.")
    pool_size: int = Field(
        8,
        ge=1,
        le=256,
        description="PostgreSQL connections of each process, one connection worker each.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Front-end processes sharing the port (SO_REUSEPORT), each with its own"
        " pool; more than 1 runs them under a supervisor.",
    )
    replica_dsns: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Read replicas' connection strings, comma-separated: read-only requests"
        " go to the least-loaded healthy one.",
    )
    replica_max_lag_ms: int = Field(
        1000,
        ge=0,
        description="A replica whose replay lag is over this is skipped until it catches up.",
    )
    queue_size: int = Field(
        256, ge=0, description="Jobs that may wait beyond the running ones; more get 503."
    )
    queue_timeout_ms: int = Field(
        5000, ge=1, description="A job waiting longer than this in the queue gets 503."
    )
    connect_timeout_ms: int = Field(
        3000,
        ge=1,
        description="How long a request waits for a database connection before 503 unavailable.",
    )
    raw_sql: RawSqlMode = Field(
        "read-only", description="Raw SQL over HTTP: off, read-only or read-write."
    )
    statement_timeout_ms: int = Field(
        30000, ge=1, description="Default and upper bound of a request's timeout_ms."
    )
    max_rows: int = Field(
        10000, ge=1, description="Rows a buffered JSON answer holds; more sets truncated."
    )
    stream_max_rows: int = Field(
        0, ge=0, description="Rows an NDJSON/CSV stream may hold; 0 means no limit."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    max_batch: int = Field(
        32, ge=1, le=1024, description="Most jobs a connection worker pipelines in one round trip."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests may still finish."
    )
    pool_max_lifetime_s: float = Field(
        3600.0, ge=10, description="A pooled connection is replaced after this many seconds."
    )
    timezone: str = Field("UTC", description="Session TimeZone: fixes timestamptz output.")
    datestyle: str = Field("ISO, MDY", description="Session DateStyle.")
    intervalstyle: str = Field("postgres", description="Session IntervalStyle.")
    sql_dir: Path = Field(
        DEFAULT_SQL_DIR, description="Folder with schema.sql, seed.sql and queries/*.sql."
    )
    data_dir: Path = Field(
        Path(platformdirs.user_data_dir("pgqg")) / "pgdata",
        description="Data directory of the embedded PostgreSQL.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    listen_channels: dict[str, list[str]] = Field(
        {},
        description="Who may listen to which channels at /v1/listen: JSON, each role to a list"
        " of channel names (a trailing * matches a prefix); the role anon is a request"
        " without a token. Empty: /v1/listen is off.",
    )
    listen_heartbeat_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="A quiet event stream gets a comment line this often, so proxies keep it open.",
    )
    listen_buffer: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Events waiting for one slow subscriber; one more drops it with a final event.",
    )
    listen_max_subscribers: int = Field(
        1000, ge=1, description="Event streams open at once at /v1/listen; more get 503."
    )

    @field_validator("replica_dsns", mode="before")
    @classmethod
    def _split_replica_dsns(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("listen_channels")
    @classmethod
    def _check_listen_channels(cls, rules: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, channels in rules.items():
            if not role:
                raise ValueError("a role name is empty")
            for rule in channels:
                if not _CHANNEL_RULE.fullmatch(rule):
                    raise ValueError(
                        f"{role}: {rule!r} is not a channel name (letters, digits, _ and $,"
                        " not starting with a digit, at most 63), a prefix ending in *, or *"
                    )
        return rules

    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as readable text, or one JSON object per line."
    )
    metrics: bool = Field(
        True, description="Serve /metrics (Prometheus) and count every request for it."
    )
    metrics_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices(
            "metrics_dir", "PGQG_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR"
        ),
        description="Shared folder where several gateway processes add up their /metrics.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = getattr(settings_cls, "config_file", None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return "PGQG_" + field.upper()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load the settings: defaults < `config_file` (TOML) < environment < `overrides`.

    `overrides` whose value is None are ignored, so unset command-line flags
    do not hide the environment.

    Raises:
        ConfigError: a value is invalid, or the TOML file names an unknown
            setting; the message names the setting by its environment variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")
    cls: type[Settings] = type("FileSettings", (Settings,), {"config_file": config_file})
    try:
        return cls(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = env_name(field) if field in Settings.model_fields else field
        lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
    return "invalid settings: " + "; ".join(lines)


def describe_settings() -> list[tuple[str, str, str]]:
    """Every setting as (environment variable, default, help line), for docs and --help."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(unset)" if default is None or default == () else str(default)
        if name == "data_dir":
            shown = "<user data dir>/pgqg/pgdata"
        elif name == "sql_dir":
            shown = "<repo>/sql"
        rows.append((env_name(name), shown, field.description or ""))
    return rows
