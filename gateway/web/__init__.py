"""The HTTP front end: the aiohttp app, its routes, request parsing, error mapping, OpenAPI.

Imports the engine, the catalog and values (a request becomes a job); never the CLI.
(Not named ``http``: the build backend runs with ``gateway/`` on its path, where that
name would hide the standard library's.)
"""

from ._app import create_app
from ._privileges import PrivilegedRoleError
from ._server import install_uvloop, serve

__all__ = ["PrivilegedRoleError", "create_app", "install_uvloop", "serve"]
