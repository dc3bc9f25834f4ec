"""The gateway's settings: one object, loaded once at start (DESIGN §5).

Sources, later wins: defaults, a TOML file, ``PGQG_*`` environment variables
(plus ``DATABASE_URL``), then values passed in (the command line). Nothing else
in the package reads ``os.environ``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

RawSqlMode = Literal["off", "read-only", "read-write"]

#: HMAC keys shorter than this are refused (RFC 7518 §3.2: at least the hash's size)
MIN_SECRET_BYTES = 32
#: settings whose value never appears in an error message
SECRET_SETTINGS = frozenset({"jwt_secret"})

#: the repository's ``sql/`` folder, next to the package
DEFAULT_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

#: a channel name /v1/listen takes: PostgreSQL's unquoted identifier syntax in ASCII, at
#: most 63 bytes (NAMEDATALEN - 1), matched as written (as pg_notify() takes it)
CHANNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
#: an entry of listen_channels: a channel name, a prefix and ``*``, or ``*`` alone
_CHANNEL_RULE = re.compile(rf"\*|{CHANNEL_NAME.pattern}\*?")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting."""


class ConfigFileError(ConfigError):
    """The TOML file is missing or not TOML; the message names the file (and line)."""


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
    allow_privileged_role: bool = Field(
        False,
        description="Serve raw SQL even when the login role is a superuser or may read the "
        "server's files, run programs, signal sessions, replicate or bypass RLS.",
    )
    raw_sql_roles: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None, description="Roles that may send raw SQL (comma-separated); unset: every role."
    )
    jwt_secret: SecretStr | None = Field(
        None, description="HS256/384/512 secret of the bearer tokens, at least 32 bytes."
    )
    jwt_jwks_file: Path | None = Field(
        None, description="JWKS file of RS256/ES256/EdDSA public keys; reread on SIGHUP."
    )
    jwt_audience: str | None = Field(
        None, description="The aud a token must name; unset: aud is not checked."
    )
    jwt_role_claim: str = Field(
        "role", description="The claim naming the role, a dotted path (app_metadata.role)."
    )
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on a token's exp and nbf."
    )
    anon_role: str | None = Field(
        None, description="Role of requests without a token; unset: they get 401."
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
    keepalives_idle_s: int = Field(
        10, ge=1, description="TCP keepalive: seconds a connection is quiet before the first probe."
    )
    keepalives_interval_s: int = Field(
        5, ge=1, description="TCP keepalive: seconds between unanswered probes."
    )
    keepalives_count: int = Field(
        3, ge=1, description="TCP keepalive: unanswered probes before the connection is dropped."
    )
    tcp_user_timeout_ms: int = Field(
        25000,
        ge=0,
        description="Sent data unacknowledged this long drops the connection (0: the OS default).",
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
    # NoDecode: the environment's value is "a, b", not a JSON list
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Web origins whose pages may call the API (comma-separated, e.g."
        " https://app.example.com), or * for any; empty: none.",
    )
    console: bool = Field(True, description="Serve the query console page at GET /.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(origin_of(str(item)) for item in value if str(item).strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _wildcard_alone(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "*" in value and len(value) > 1:
            raise ValueError("* already allows every origin; give it alone")
        return tuple(dict.fromkeys(value))

    @property
    def identity_configured(self) -> bool:
        """Whether requests are authenticated (a token names who sends them): the
        same as `identity`; it turns on the check of `_cors_fits_identity`."""
        return self.identity

    @model_validator(mode="after")
    def _cors_fits_identity(self) -> Settings:
        # With identity, a page's requests act for the user whose token it
        # holds: which pages may send them has to be an explicit list, so a
        # cross-site page cannot. Settings checks that weigh CORS against other
        # settings belong here, where start-up refuses them.
        if self.identity_configured and "*" in self.cors_origins:
            raise ValueError(
                "PGQG_CORS_ORIGINS=* is refused when identity is configured: list the origins"
            )
        return self

    @field_validator("raw_sql_roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        """``a, b`` as the environment gives it; a list as TOML does."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple) and not all(value):
            raise ValueError("an empty role name")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            size = len(value.get_secret_value().encode())
            if size < MIN_SECRET_BYTES:
                raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes, not {size}")
        return value

    @field_validator("jwt_role_claim")
    @classmethod
    def _dotted_path(cls, value: str) -> str:
        if not all(value.split(".")):
            raise ValueError("a claim name, or names joined by dots (app_metadata.role)")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        if self.jwt_secret is not None and self.jwt_jwks_file is not None:
            raise ValueError("set PGQG_JWT_SECRET or PGQG_JWT_JWKS_FILE, not both")
        if self.raw_sql_roles is not None and not self.identity:
            raise ValueError(
                "PGQG_RAW_SQL_ROLES needs requests with roles:"
                " set PGQG_JWT_SECRET, PGQG_JWT_JWKS_FILE or PGQG_ANON_ROLE"
            )
        return self

    @property
    def identity(self) -> bool:
        """Whether requests run as roles (a token's, or the anonymous role)."""
        return (
            self.jwt_secret is not None
            or self.jwt_jwks_file is not None
            or self.anon_role is not None
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


#: ``PGQG_`` variables that are not settings but are read elsewhere: by the build
#: (setup.py) and by the test suite
OTHER_VARIABLES = frozenset({"PGQG_COMPILE", "PGQG_TEST_DSN"})


def origin_of(text: str) -> str:
    """`text` as a browser's ``Origin`` header spells it, or ``*``.

    ``scheme://host[:port]``: lower case, no default port, no path.

    Raises:
        ValueError: `text` is not an origin (a path, a query, user info, or
            ``null``, which every sandboxed page and local file sends).
    """
    text = text.strip()
    if text == "*":
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"{text!r} is not an origin such as https://app.example.com[:port]")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6, bracketed as in a URL
    if port is None or port == {"http": 80, "https": 443}[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return "PGQG_" + field.upper()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load the settings: defaults < `config_file` (TOML) < environment < `overrides`.

    `overrides` whose value is None are ignored, so unset command-line flags
    do not hide the environment.

    Raises:
        ConfigError: a value is invalid, or the TOML file names an unknown
            setting; the message names the setting by its environment variable
            (a TOML key by itself, with the setting it probably meant).
        ConfigFileError: the TOML file is missing or malformed.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is not None and not config_file.is_file():
        raise ConfigFileError(f"config file not found: {config_file}")
    cls: type[Settings] = type("FileSettings", (Settings,), {"config_file": config_file})
    try:
        return cls(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # tomllib's message ends with "(at line 3, column 5)"
        raise ConfigFileError(f"{config_file}: not valid TOML: {exc}") from None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across settings: its message names them; its
            lines.append(message)  # input is all of them, secrets too: not shown
            continue
        field = str(err["loc"][0])
        if err["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file is not None else ""
            lines.append(f"unknown setting {field!r}{where}{_did_you_mean(field)}")
            continue
        name = env_name(field) if field in Settings.model_fields else field
        shown = "" if field in SECRET_SETTINGS else f" (got {err.get('input')!r})"
        lines.append(f"{name}: {message}{shown}")
    return "invalid settings: " + "; ".join(lines)


def _closest_setting(name: str) -> str | None:
    """The setting *name* (``pool-size``, ``poolsize``) most probably means, if any."""
    wanted = name.lower().replace("-", "_")
    fields = list(Settings.model_fields)
    if wanted in fields:
        return wanted
    squashed = {field.replace("_", ""): field for field in fields}
    if wanted.replace("_", "") in squashed:
        return squashed[wanted.replace("_", "")]
    close = difflib.get_close_matches(wanted, fields, n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(name: str) -> str:
    closest = _closest_setting(name)
    return f" (did you mean {closest!r}?)" if closest else ""


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``PGQG_`` environment variable that is no setting (a typo
    such as ``PGQG_POOLSIZE``): the settings ignore them without a word."""
    environ = os.environ if environ is None else environ
    known = {env_name(field) for field in Settings.model_fields} | OTHER_VARIABLES
    found = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith("PGQG_") or name in known:
            continue
        closest = _closest_setting(name.removeprefix("PGQG_"))
        hint = f"; did you mean {env_name(closest)}?" if closest else ""
        found.append(f"{variable} is not a setting and is ignored{hint}")
    return found


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
