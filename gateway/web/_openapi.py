"""The OpenAPI 3 description of the v1 API, served at ``/openapi.json``.

Every named query of the catalog has a path of its own, its parameters with
their types (`Param.json_schema`), so generated clients and fuzzers can call
it; ``/v1/queries/{name}`` stays for the generic client.

Optional fields of a body take null for "not given" (the default), every one
of them, and their schemas say so; in a query string an option is either there
or not. Integer fields take ``1000.0`` as JSON Schema's integers do.
"""

from __future__ import annotations

from typing import Any

from .._settings import CHANNEL_NAME
from ..catalog._catalog import Catalog, NamedQuery
from ._requests import ISOLATION_LEVELS, RESERVED_QUERY_KEYS, SHAPES

#: every error status an endpoint that runs SQL may answer (401 only with tokens on)
_ERROR_STATUSES: tuple[str, ...] = ("400", "401", "403", "404", "405", "406", "409", "413")
_ERROR_STATUSES += ("415", "500", "502", "503", "504")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _rows(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A 200 answer: the JSON result, or the rows streamed as NDJSON or CSV."""
    return {
        "description": description,
        "content": {
            "application/json": {"schema": schema},
            "application/x-ndjson": {
                "schema": {
                    "type": "string",
                    "description": "one JSON row per line (object, or array with"
                    ' shape=arrays); a failure midway ends with a line {"error": …}'
                    " and a cut response",
                }
            },
            "text/csv": {
                "schema": {
                    "type": "string",
                    "description": "a header line, then PostgreSQL's text output of every"
                    " cell, RFC 4180 quoting; a failure midway cuts the response",
                }
            },
        },
    }


_FORMAT = {
    "name": "format",
    "in": "query",
    "required": False,
    "description": "output format; overrides the Accept header",
    "schema": {"type": "string", "enum": ["json", "ndjson", "csv"]},
}


def _errors() -> dict[str, Any]:
    return {status: {"$ref": "#/components/responses/Error"} for status in _ERROR_STATUSES}


#: the options, as a query string gives them
_QUERY_OPTIONS: dict[str, Any] = {
    "timeout_ms": {"type": "integer", "minimum": 1, "description": "capped by the gateway"},
    "max_rows": {
        "type": "integer",
        "minimum": 0,
        "description": "JSON: at most PGQG_MAX_ROWS, more sets truncated;"
        " NDJSON/CSV: no limit unless given or set by PGQG_STREAM_MAX_ROWS",
    },
    "shape": {"type": "string", "enum": list(SHAPES)},
}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional body field's schema: null means not given."""
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


#: the options, as a JSON body gives them
_OPTIONS = {name: _or_null(schema) for name, schema in _QUERY_OPTIONS.items()}


# --- POST /sql, Neon's protocol (gateway/web/_neon.py) -----------------------------------

#: Neon's names of the isolation levels (``_neon.ISOLATION_LEVELS``; the tests compare them)
_NEON_ISOLATION_LEVELS = ["ReadUncommitted", "ReadCommitted", "RepeatableRead", "Serializable"]
_NULLABLE_TEXT = {"type": ["string", "null"]}
_NEON_ERROR_FIELDS = (
    "detail",
    "hint",
    "position",
    "internalPosition",
    "internalQuery",
    "severity",
    "where",
    "table",
    "column",
    "schema",
    "dataType",
    "constraint",
    "file",
    "line",
    "routine",
)

_NEON_SCHEMAS: dict[str, Any] = {
    "NeonQuery": {
        "type": "object",
        "required": ["query"],
        "additionalProperties": False,
        "properties": {
            "query": {"type": "string", "minLength": 1, "description": "one statement, $1…"},
            "params": _or_null({"type": "array", "items": {}}),
            "arrayMode": _or_null({"type": "boolean", "description": "overrides Neon-Array-Mode"}),
        },
    },
    "NeonBatch": {
        "type": "object",
        "required": ["queries"],
        "additionalProperties": False,
        "properties": {"queries": {"type": "array", "items": _ref("NeonQuery")}},
    },
    "NeonField": {
        "type": "object",
        "required": [
            "name",
            "dataTypeID",
            "tableID",
            "columnID",
            "dataTypeSize",
            "dataTypeModifier",
            "format",
        ],
        "properties": {
            "name": {"type": "string"},
            "dataTypeID": {"type": "integer"},
            "tableID": {"type": "integer"},
            "columnID": {"type": "integer"},
            "dataTypeSize": {"type": "integer"},
            "dataTypeModifier": {"type": "integer"},
            "format": {"type": "string", "enum": ["text", "binary"]},
        },
    },
    "NeonResult": {
        "type": "object",
        "required": ["rowAsArray", "fields", "rows", "command", "rowCount"],
        "properties": {
            "rowAsArray": {"type": "boolean"},
            "fields": {"type": "array", "items": _ref("NeonField")},
            "rows": {"type": "array", "items": {"type": ["object", "array"]}},
            "command": {"type": "string"},
            "rowCount": {"type": ["integer", "null"]},
        },
    },
    "NeonError": {
        "type": "object",
        "required": ["message", "code"],
        "properties": {
            "message": {"type": "string"},
            "code": {"type": "string", "description": "the SQLSTATE, else the gateway's code"},
            **{name: _NULLABLE_TEXT for name in _NEON_ERROR_FIELDS},
        },
    },
}


def _neon_header(name: str, description: str, enum: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if enum is not None:
        schema["enum"] = enum
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _neon_sql() -> dict[str, Any]:
    """``POST /sql``: Neon's SQL over HTTP, for @neondatabase/serverless."""
    flag = "on only when exactly true"
    error = _json(_ref("NeonError"), "an error in Neon's body")
    return {
        "post": {
            "summary": "Neon's SQL over HTTP (the @neondatabase/serverless driver)",
            "description": "One query, or a batch in one transaction. Read-only and raw"
            " SQL rules as /v1/query; the body is JSON whatever its Content-Type.",
            "parameters": [
                _neon_header("Neon-Connection-String", "accepted, not used"),
                _neon_header("Neon-Raw-Text-Output", f"values as PostgreSQL's text; {flag}"),
                _neon_header("Neon-Array-Mode", f"rows as arrays; {flag}"),
                _neon_header(
                    "Neon-Batch-Isolation-Level", "a batch's isolation", _NEON_ISOLATION_LEVELS
                ),
                _neon_header("Neon-Batch-Read-Only", f"a batch read-only; {flag}"),
                _neon_header("Neon-Batch-Deferrable", f"a batch deferrable; {flag}"),
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [_ref("NeonQuery"), _ref("NeonBatch")]}
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "oneOf": [
                            _ref("NeonResult"),
                            {
                                "type": "object",
                                "required": ["results"],
                                "properties": {
                                    "results": {"type": "array", "items": _ref("NeonResult")}
                                },
                            },
                        ]
                    },
                    "the query's result, or the batch's results in order",
                ),
                **{status: error for status in ("400", "403", "405", "413", "500", "503", "507")},
            },
        }
    }


#: raw SQL's ``read_only`` (`POST /v1/query`, `POST /v1/transaction`)
_READ_ONLY = {
    "type": ["boolean", "null"],
    "description": "default: true when the gateway's raw SQL is read-only (false is then"
    " refused); a read-only request may be answered by a read replica",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "sqlstate": {"type": ["string", "null"]},
                    "detail": {"type": ["string", "null"]},
                    "hint": {"type": ["string", "null"]},
                    "position": {"type": ["integer", "null"]},
                },
            }
        },
    },
    "Column": {
        "type": "object",
        "required": ["name", "type", "type_oid"],
        "properties": {
            "name": {"type": "string"},
            "type": {"type": "string"},
            "type_oid": {"type": "integer"},
        },
    },
    "Result": {
        "type": "object",
        "required": ["columns", "rows", "row_count", "command", "truncated"],
        "properties": {
            "columns": {"type": "array", "items": _ref("Column")},
            "rows": {"type": "array", "items": {"type": ["object", "array"]}},
            "row_count": {"type": "integer"},
            "command": {"type": "string"},
            "truncated": {"type": "boolean"},
            "elapsed_ms": {"type": "number"},
        },
    },
    "Statement": {
        "type": "object",
        "required": ["sql"],
        "additionalProperties": False,
        "properties": {
            "sql": {"type": "string", "minLength": 1},
            "params": {"type": ["array", "null"], "items": {}},
        },
    },
    "QueryRequest": {
        "type": "object",
        "required": ["sql"],
        "additionalProperties": False,
        "properties": {
            "sql": {"type": "string", "minLength": 1, "description": "one statement, $1… params"},
            "params": {"type": ["array", "null"], "items": {}},
            "read_only": _READ_ONLY,
            **_OPTIONS,
        },
    },
    "TransactionRequest": {
        "type": "object",
        "required": ["statements"],
        "additionalProperties": False,
        "properties": {
            "statements": {"type": "array", "minItems": 1, "items": _ref("Statement")},
            "isolation": _or_null({"type": "string", "enum": list(ISOLATION_LEVELS)}),
            "read_only": _READ_ONLY,
            **_OPTIONS,
        },
    },
    "NamedQueryRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"params": {"type": ["object", "null"]}, **_OPTIONS},
    },
    "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
    **_NEON_SCHEMAS,
}


def _query_options() -> list[dict[str, Any]]:
    return [
        *(
            {"name": key, "in": "query", "required": False, "schema": schema}
            for key, schema in _QUERY_OPTIONS.items()
        ),
        _FORMAT,
    ]


def _named_query_params() -> list[dict[str, Any]]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    return [name, *_query_options()]


def _named_query_path(query: NamedQuery) -> dict[str, Any]:
    """The operations of one named query: its own parameters, with their types."""
    result = _rows(_ref("Result"), "the query's result")
    summary = query.doc.split("\n", 1)[0] or f"the named query {query.name}"
    params: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": [p.name for p in query.params],
        "properties": {p.name: p.json_schema() for p in query.params},
    }
    if not query.params:
        params["type"] = ["object", "null"]  # nothing to give: {} or null
    body = {
        "type": "object",
        "additionalProperties": False,
        "required": ["params"] if query.params else [],
        "properties": {"params": params, **_OPTIONS},
    }
    operations: dict[str, Any] = {
        "post": {
            "summary": summary,
            "description": query.doc,
            "operationId": f"{query.name}_post",
            "parameters": [_FORMAT],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": result, **_errors()},
        }
    }
    # a writing query answers GET 405; a parameter named as an option cannot be in
    # a query string (the option takes it)
    if query.read_only and not any(p.name in RESERVED_QUERY_KEYS for p in query.params):
        in_query = [
            {
                "name": p.name,
                "in": "query",
                "required": True,
                "schema": p.json_schema(in_query_string=True),
            }
            for p in query.params
        ]
        operations["get"] = {
            "summary": summary,
            "description": query.doc,
            "operationId": f"{query.name}_get",
            "parameters": [*in_query, *_query_options()],
            "responses": {"200": result, **_errors()},
        }
    return operations


_CHANNEL = {"type": "string", "pattern": f"^{CHANNEL_NAME.pattern}$"}


def _listen(path_channel: bool) -> dict[str, Any]:
    """``GET /v1/listen[/{channel}]``: NOTIFYs as server-sent events."""
    more = {
        "name": "channel",
        "in": "query",
        "required": not path_channel,
        "description": "a (further) channel to follow; repeat it for several",
        "schema": {"type": "array", "items": _CHANNEL},
        "style": "form",
        "explode": True,
    }
    path = {"name": "channel", "in": "path", "required": True, "schema": _CHANNEL}
    return {
        "get": {
            "summary": "Stream the NOTIFYs of channels as server-sent events",
            "description": "Events: notify (data: the payload; id: channel:number), missed"
            " and dropped (data: JSON with reason and message). Off unless"
            " PGQG_LISTEN_CHANNELS allows the request's role the channels.",
            "parameters": [path, more] if path_channel else [more],
            "responses": {
                "200": {
                    "description": "the event stream, started once every channel is listened to",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_errors(),
            },
        }
    }


def _paths(catalog: Catalog) -> dict[str, Any]:
    result = _rows(_ref("Result"), "the statement's result")
    named = {f"/v1/queries/{query.name}": _named_query_path(query) for query in catalog}
    return {
        "/v1/query": {
            "post": {
                "summary": "Run one raw SQL statement",
                "parameters": [_FORMAT],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("QueryRequest")}},
                },
                "responses": {"200": result, **_errors()},
            }
        },
        "/v1/transaction": {
            "post": {
                "summary": "Run statements all or nothing on one connection",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("TransactionRequest")}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["results"],
                            "properties": {
                                "results": {"type": "array", "items": _ref("Result")},
                                "elapsed_ms": {"type": "number"},
                            },
                        },
                        "each statement's result",
                    ),
                    **_errors(),
                },
            }
        },
        "/v1/queries": {
            "get": {
                "summary": "The catalog of named queries",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["queries"],
                            "properties": {
                                "queries": {"type": "array", "items": {"type": "object"}}
                            },
                        },
                        "the catalog",
                    )
                },
            }
        },
        "/v1/queries/{name}": {
            "get": {
                "summary": "Run a read-only named query (parameters in the query string);"
                " each query of the catalog has its own path too, with its parameters",
                "parameters": _named_query_params(),
                "responses": {"200": result, **_errors()},
            },
            "post": {
                "summary": "Run a named query (parameters in the body)",
                "parameters": [_named_query_params()[0], _FORMAT],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NamedQueryRequest")}},
                },
                "responses": {"200": result, **_errors()},
            },
        },
        **named,
        "/v1/listen": _listen(path_channel=False),
        "/v1/listen/{channel}": _listen(path_channel=True),
        "/sql": _neon_sql(),
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json(_ref("Status"), "the process answers")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": _json(_ref("Status"), "a pooled connection works"),
                    "503": {"$ref": "#/components/responses/Error"},
                },
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "Dispatcher and pool figures",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["queue", "connections", "pool"]},
                        "queue depth, per-connection load, pool stats, live event streams",
                    )
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (404 when PGQG_METRICS is false)",
                "responses": {
                    "200": {
                        "description": "every pgqg_* metric, in Prometheus' text format"
                        " (OpenMetrics when the Accept header asks for it)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": {"$ref": "#/components/responses/Error"},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
    }


def openapi_document(catalog: Catalog) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with a path for each named query of `catalog`."""
    names = ", ".join(q.name for q in catalog) or "none"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pgqg",
            "version": "1",
            "description": f"PostgreSQL query gateway. Named queries: {names}.",
        },
        "paths": _paths(catalog),
        "components": {
            "schemas": _SCHEMAS,
            "responses": {"Error": _json(_ref("Error"), "an error (DESIGN §3)")},
        },
    }
