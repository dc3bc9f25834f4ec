"""pgqg: an async PostgreSQL query gateway.

SQL, or the name of a stored query, comes in over HTTP; a bounded queue hands
it to a small set of long-lived, pipelined connections; rows go back as JSON,
NDJSON or CSV, with no value rounded.
"""

from ._errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    QueryError,
    RawSqlDisabled,
    Timeout,
    TooLarge,
    Unavailable,
    UnknownQuery,
    UnsupportedMediaType,
    status_for_sqlstate,
)
from ._settings import ConfigError, Settings, load_settings
from .catalog import Catalog, CatalogError, NamedQuery, Param
from .engine import Dispatcher, Job, Statement
from .values import Codec, Column, StatementResult, loads_exact, param_to_text
from .web import create_app

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Catalog",
    "CatalogError",
    "Codec",
    "Column",
    "ConfigError",
    "Dispatcher",
    "Forbidden",
    "GatewayError",
    "Job",
    "MethodNotAllowed",
    "NamedQuery",
    "NotAcceptable",
    "NotFound",
    "OutcomeUnknown",
    "Overloaded",
    "Param",
    "QueryError",
    "RawSqlDisabled",
    "Settings",
    "Statement",
    "StatementResult",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "UnknownQuery",
    "UnsupportedMediaType",
    "__version__",
    "create_app",
    "load_settings",
    "loads_exact",
    "param_to_text",
    "status_for_sqlstate",
]
