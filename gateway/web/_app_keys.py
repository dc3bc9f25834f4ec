"""Typed application state (aiohttp `AppKey`), set at start-up, then frozen."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from .._settings import Settings
from ..catalog._catalog import Catalog
from ..engine._dispatcher import Dispatcher
from ..engine._listener import Listener
from ..engine._replicas import Replicas
from ..values._encoding import Codec
from ._auth import Authenticator
from ._metrics import MetricsSource

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
CODEC = web.AppKey("codec", Codec)
DSN = web.AppKey("dsn", str)
POOL = web.AppKey("pool", AsyncConnectionPool[Any])
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
#: set only when read replicas are configured
REPLICAS = web.AppKey("replicas", Replicas)
LISTENER = web.AppKey("listener", Listener)
METRICS = web.AppKey("metrics", MetricsSource)
AUTH = web.AppKey("auth", Authenticator)
