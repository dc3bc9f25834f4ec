"""``pgqg token``: a development token, signed with the gateway's own secret.

For trying roles and row-level security by hand and in the docs; in production
the tokens come from the application's identity provider, signed with a key the
gateway only verifies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jwt

from .._settings import Settings

ALGORITHM = "HS256"


class NoSecret(ValueError):
    """The settings hold no secret to sign with."""


def make_token(
    settings: Settings,
    *,
    role: str,
    sub: str | None = None,
    ttl_s: int = 3600,
    claims: Mapping[str, str] | None = None,
) -> str:
    """A token naming `role` where the gateway reads it (``jwt_role_claim``), valid
    for `ttl_s` seconds, for ``jwt_audience`` when one is set.

    Raises:
        NoSecret: no ``jwt_secret`` is set.
    """
    if settings.jwt_secret is None:
        raise NoSecret(
            "pgqg token signs with PGQG_JWT_SECRET, which is not set"
            " (a JWKS file holds public keys only: its tokens come from their issuer)"
        )
    now = int(time.time())
    payload: dict[str, Any] = {**(claims or {}), "iat": now, "exp": now + ttl_s}
    if sub is not None:
        payload["sub"] = sub
    if settings.jwt_audience is not None:
        payload["aud"] = settings.jwt_audience
    *parents, last = settings.jwt_role_claim.split(".")
    where = payload
    for name in parents:
        where = where.setdefault(name, {})
    where[last] = role
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM)
