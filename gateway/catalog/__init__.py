"""The catalog: named queries read from ``sql/queries/*.sql``, and SQL files split into statements.

Imports ``gateway.values`` and ``gateway._errors``; never the engine, HTTP or the CLI.
"""

from ._catalog import Catalog, CatalogError, NamedQuery, Param
from ._parser import parse_queries
from ._sqlfile import SqlFileError, SqlStatement, split_statements

__all__ = [
    "Catalog",
    "CatalogError",
    "NamedQuery",
    "Param",
    "SqlFileError",
    "SqlStatement",
    "parse_queries",
    "split_statements",
]
