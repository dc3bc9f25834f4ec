"""Values: parameters into PostgreSQL's text, rows out as exact JSON, NDJSON or CSV.

Imports only ``gateway._errors`` of the gateway; every other package may import it.
"""

from ._encoding import (
    Codec,
    JSONNumber,
    NegativeZero,
    list_params,
    loads_exact,
    param_to_text,
    params_to_text,
)
from ._formats import OutputFormat, StreamEncoder, negotiate, stream_encoder
from ._results import (
    DESCRIBED_SHAPE,
    TEXT_SHAPE,
    Column,
    Field,
    ResultConverter,
    Row,
    StatementResult,
    command_name,
    fields_json,
)

__all__ = [
    "DESCRIBED_SHAPE",
    "TEXT_SHAPE",
    "Codec",
    "Column",
    "Field",
    "JSONNumber",
    "NegativeZero",
    "OutputFormat",
    "ResultConverter",
    "Row",
    "StatementResult",
    "StreamEncoder",
    "command_name",
    "fields_json",
    "list_params",
    "loads_exact",
    "negotiate",
    "param_to_text",
    "params_to_text",
    "stream_encoder",
]
