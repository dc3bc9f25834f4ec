"""The OpenAPI 3 description of the v1 API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from .._settings import CHANNEL_NAME
from ..catalog._catalog import Catalog
from ._requests import ISOLATION_LEVELS, SHAPES

_ERROR_STATUSES = ("400", "403", "404", "405", "406", "409", "413", "415", "500", "503", "504")


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


_OPTIONS: dict[str, Any] = {
    "timeout_ms": {"type": "integer", "minimum": 1, "description": "capped by the gateway"},
    "max_rows": {
        "type": "integer",
        "minimum": 0,
        "description": "JSON: at most PGQG_MAX_ROWS, more sets truncated;"
        " NDJSON/CSV: no limit unless given or set by PGQG_STREAM_MAX_ROWS",
    },
    "shape": {"type": "string", "enum": list(SHAPES)},
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
            "params": {"type": "array", "items": {}},
        },
    },
    "QueryRequest": {
        "type": "object",
        "required": ["sql"],
        "additionalProperties": False,
        "properties": {
            "sql": {"type": "string", "minLength": 1, "description": "one statement, $1… params"},
            "params": {"type": "array", "items": {}},
            "read_only": {
                "type": "boolean",
                "description": "run it read-only (always so in read-only mode); a read"
                " replica may answer",
            },
            **_OPTIONS,
        },
    },
    "TransactionRequest": {
        "type": "object",
        "required": ["statements"],
        "additionalProperties": False,
        "properties": {
            "statements": {"type": "array", "minItems": 1, "items": _ref("Statement")},
            "isolation": {"type": "string", "enum": list(ISOLATION_LEVELS)},
            "read_only": {"type": "boolean"},
            **_OPTIONS,
        },
    },
    "NamedQueryRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"params": {"type": "object"}, **_OPTIONS},
    },
    "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
}


def _named_query_params() -> list[dict[str, Any]]:
    return [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        *(
            {"name": key, "in": "query", "required": False, "schema": schema}
            for key, schema in _OPTIONS.items()
        ),
        _FORMAT,
    ]


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


def _paths() -> dict[str, Any]:
    result = _rows(_ref("Result"), "the statement's result")
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
                "summary": "Run a read-only named query (parameters in the query string)",
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
        "/v1/listen": _listen(path_channel=False),
        "/v1/listen/{channel}": _listen(path_channel=True),
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
    """The OpenAPI 3.1 document; the named queries are listed in the description."""
    names = ", ".join(q.name for q in catalog) or "none"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pgqg",
            "version": "1",
            "description": f"PostgreSQL query gateway. Named queries: {names}.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "responses": {"Error": _json(_ref("Error"), "an error (DESIGN §3)")},
        },
    }
