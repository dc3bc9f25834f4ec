"""Who a request runs as: its bearer token verified, and the role and claims it names.

PostgREST's model: ``Authorization: Bearer <jwt>`` names a PostgreSQL role in a
claim (``role``, or a dotted path such as ``app_metadata.role``), and the request
runs as that role, its claims readable in SQL (`gateway.engine._identity`). A
request without a token runs as the anonymous role, or gets 401 when there is none.

Tokens are verified with PyJWT: the signature, ``exp`` and ``nbf`` (with a leeway
for clock skew), and ``aud`` when an audience is configured. The algorithms are
fixed by the kind of key, never taken from the token alone: with a secret, HS256,
and HS384 and HS512 when it is long enough for them (48 and 64 bytes); with a JWKS
file, RS256, ES256 or EdDSA, each public key for its own algorithm only. So
``alg: none`` and HS/RS confusion fail as an algorithm not accepted here.

A verified token is kept, by its exact text, until it expires: the next request
with it costs a dictionary look-up instead of a signature check. Every failure is an
`InvalidToken` whose message is one of this module's fixed sentences; no token,
claim or key reaches a message or a log line.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp.http_exceptions import BadHttpMessage

from .._errors import ForbiddenRole, InvalidToken, Unauthorized
from .._settings import ConfigError, Settings
from ..engine._identity import Identity, role_problem

log = logging.getLogger("gateway.auth")

#: a token longer than this is refused unread (a real one is well under 2 KiB)
MAX_TOKEN_BYTES = 4096
#: verified tokens kept; when full, the expired ones go, then the oldest
CACHED_TOKENS = 4096
#: HMAC algorithms, each with the shortest secret it takes (RFC 7518 §3.2: the hash's size)
SECRET_ALGORITHMS = (("HS256", 32), ("HS384", 48), ("HS512", 64))
#: what a JWKS key may verify: one algorithm per kind of public key
PUBLIC_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})

#: PyJWT's failures, in the gateway's words (first match wins: subclasses first)
_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.MissingRequiredClaimError, "the token lacks a claim this gateway requires"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted here"),
    (jwt.DecodeError, "the token is malformed"),
)


def _failure(exc: Exception) -> InvalidToken:
    for kind, message in _FAILURES:
        if isinstance(exc, kind):
            return InvalidToken(message)
    return InvalidToken("the token is not valid")


@dataclass(frozen=True, slots=True)
class _PublicKey:
    """One key of a JWKS file, with the one algorithm it verifies."""

    kid: str | None
    algorithm: str
    key: Any


def read_jwks(path: Path) -> tuple[_PublicKey, ...]:
    """The public keys of a JWKS file (``{"keys": [...]}``, or one key alone).

    Raises:
        ConfigError: the file cannot be read, is not a JWKS, holds a private or a
            symmetric key, or a key for another algorithm than RS256, ES256, EdDSA.
    """
    where = f"PGQG_JWT_JWKS_FILE ({path})"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read it as JSON: {exc}") from None
    found = document.get("keys", [document]) if isinstance(document, dict) else None
    if not isinstance(found, list) or not found:
        raise ConfigError(f'{where}: not a JWKS: expected {{"keys": [...]}} with a key or more')
    return tuple(_public_key(item, f"{where}, key {n}") for n, item in enumerate(found, 1))


def _public_key(item: Any, where: str) -> _PublicKey:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: not a JSON object")
    if "d" in item or item.get("kty") == "oct":
        raise ConfigError(f"{where}: a private or symmetric key; give public keys only")
    try:
        parsed = jwt.PyJWK(item)
    except jwt.PyJWTError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    algorithm = parsed.algorithm_name
    if algorithm not in PUBLIC_ALGORITHMS:
        raise ConfigError(f"{where}: {algorithm} keys are not accepted (RS256, ES256, EdDSA)")
    kid = item.get("kid")
    return _PublicKey(kid if isinstance(kid, str) else None, algorithm, parsed.key)


class Authenticator:
    """Turns a request's ``Authorization`` header into the `Identity` it runs as.

    Made from the settings at start-up (by the app, and by ``pgqg serve`` first, so a
    bad JWKS file fails before anything starts); `identify` is called once per
    request that runs SQL, and `reload` on SIGHUP.
    """

    def __init__(self, settings: Settings) -> None:
        """Raises ConfigError: the JWKS file is unusable, or the anonymous role is
        not a role name."""
        self.enabled = settings.identity
        self._settings = settings
        self._secret = (
            settings.jwt_secret.get_secret_value().encode()
            if settings.jwt_secret is not None
            else None
        )
        self._secret_algorithms = tuple(
            name for name, size in SECRET_ALGORITHMS if len(self._secret or b"") >= size
        )
        self._keys: tuple[_PublicKey, ...] = ()
        if settings.jwt_jwks_file is not None:
            self._keys = read_jwks(settings.jwt_jwks_file)
        self._role_path = settings.jwt_role_claim.split(".")
        self._anonymous: Identity | None = None
        if settings.anon_role is not None:
            try:
                self._anonymous = Identity(settings.anon_role, {})
            except ValueError as exc:
                raise ConfigError(f"PGQG_ANON_ROLE: {exc}") from None
        self._options: dict[str, Any] = {
            "verify_aud": settings.jwt_audience is not None,
            "require": ["aud"] if settings.jwt_audience is not None else [],
        }
        #: token text -> (its identity, the time.time() it stops being valid at)
        self._verified: dict[str, tuple[Identity, float]] = {}

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity a request with this ``Authorization`` header runs as; None
        when this gateway runs no request as a role.

        Raises:
            Unauthorized: no token, and no anonymous role.
            InvalidToken: the header is not ``Bearer <token>``, or the token does
                not verify, or names no role and there is no anonymous role.
            ForbiddenRole: the token names something that cannot be a role.
        """
        if not self.enabled:
            return None
        if authorization is None:
            if self._anonymous is None:
                raise Unauthorized("this gateway needs a bearer token (Authorization: Bearer …)")
            return self._anonymous
        token = _bearer_token(authorization)
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        claims = self._verify(token)
        identity = self._identity(claims)
        self._remember(token, identity, claims)
        return identity

    def reload(self) -> None:
        """Read the JWKS file again (SIGHUP); forget the tokens verified with the old keys.

        On failure the old keys stay, and the failure is logged.
        """
        path = self._settings.jwt_jwks_file
        if path is None:
            return
        try:
            keys = read_jwks(path)
        except ConfigError as exc:
            log.error("SIGHUP: the JWKS file was not reloaded, the old keys stay: %s", exc)
            return
        self._keys = keys
        self._verified.clear()
        log.info("SIGHUP: reloaded %d key(s) from %s", len(keys), path)

    # --- verifying ----------------------------------------------------------------------

    def _verify(self, token: str) -> dict[str, Any]:
        if self._secret is not None:
            return self._decode(token, self._secret, self._secret_algorithms)
        if not self._keys:
            raise InvalidToken("this gateway accepts no tokens: it has no key to verify them")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _failure(exc) from None
        algorithm, kid = header.get("alg"), header.get("kid")
        keys = [k for k in self._keys if k.algorithm == algorithm and kid in (None, k.kid)]
        if not keys:
            if algorithm not in PUBLIC_ALGORITHMS:
                raise InvalidToken("the token's algorithm is not accepted here")
            raise InvalidToken("no key of this gateway matches the token")
        failure: InvalidToken | None = None
        for key in keys:  # several only without a kid: the first that verifies
            try:
                return self._decode(token, key.key, (key.algorithm,))
            except InvalidToken as exc:
                failure = exc
        assert failure is not None
        raise failure

    def _decode(self, token: str, key: Any, algorithms: tuple[str, ...]) -> dict[str, Any]:
        settings = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                audience=settings.jwt_audience,
                leeway=settings.jwt_leeway_s,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.PyJWTError as exc:
            raise _failure(exc) from None
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        role = _claim(claims, self._role_path)
        if role is None:
            if self._anonymous is None:
                raise InvalidToken("the token names no role, and there is no anonymous role")
            role = self._anonymous.role
        elif not isinstance(role, str):
            raise InvalidToken("the token's role claim is not a string")
        problem = role_problem(role)
        if problem is not None:
            raise ForbiddenRole(f"the token's role cannot be used: {problem}")
        try:
            return Identity(role, claims)
        except ValueError:
            raise InvalidToken("the token's claims cannot be passed to PostgreSQL") from None

    def _remember(self, token: str, identity: Identity, claims: Mapping[str, Any]) -> None:
        expires = claims.get("exp")
        until = float("inf") if expires is None else float(expires) + self._settings.jwt_leeway_s
        cache = self._verified
        if len(cache) >= CACHED_TOKENS:
            now = time.time()
            for old in [t for t, (_, end) in cache.items() if end <= now]:
                del cache[old]
            while len(cache) >= CACHED_TOKENS:
                del cache[next(iter(cache))]
        cache[token] = (identity, until)


def _bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises:
        InvalidToken: another scheme, no token, a token over `MAX_TOKEN_BYTES`, or
            one with characters no token has.
    """
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("the Authorization header must be: Bearer, a space, the token")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    if not token.isascii():
        raise InvalidToken("the token is malformed")
    return token


def _claim(claims: Mapping[str, Any], path: list[str]) -> Any:
    """The claim at a dotted `path` (``app_metadata.role``); None when it is missing."""
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping) or name not in value:
            return None
        value = value[name]
    return value


class _NoTokensInParseErrors(logging.Filter):
    """aiohttp logs a request it cannot parse with the start of the offending line:
    of an over-long ``Authorization`` header, that is the start of a bearer token.
    Whether this filter comes before or after another that rewrites such a record
    (`gateway.web._server.BadRequestsInOneLine`), the token is not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage) and "bearer" in str(error).lower():
            record.args = (record.getMessage(), type(error).__name__)
            record.msg = "%s (%s in a header that holds a bearer token, not shown)"
            record.exc_info = record.exc_text = None
        elif "bearer" in str(record.msg).lower() or any(
            "bearer" in str(arg).lower() for arg in _args(record)
        ):
            record.msg, record.args = _BEARER.sub(r"\1(not shown)", record.getMessage()), ()
        return True


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)


#: "Bearer" and what follows it, as far as a token's characters go
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


_NO_TOKENS = _NoTokensInParseErrors()


def keep_tokens_out_of_aiohttp_logs() -> None:
    """Filter aiohttp's log of unparsable requests (`_NoTokensInParseErrors`); idempotent."""
    logger = logging.getLogger("aiohttp.server")
    if _NO_TOKENS not in logger.filters:
        logger.addFilter(_NO_TOKENS)
