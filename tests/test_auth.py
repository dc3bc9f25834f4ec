"""Bearer tokens (web/_auth.py): what verifies, what is refused and how, and the cache.

The `Authenticator` is tried alone first (no database); then through a gateway, where
every refusal must be a 401 with the JSON error shape and a ``WWW-Authenticate``
challenge, quote nothing of the token, and leave the gateway serving.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import TEST_REQUEST_ROLE, ClientFactory
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from support import JWT_SECRET, Served, assert_error, bearer, get_stats, sign

import gateway.web._auth as auth_module
from gateway import ConfigError, load_settings
from gateway._errors import ForbiddenRole, InvalidToken, Unauthorized
from gateway.web._auth import MAX_TOKEN_BYTES, Authenticator

# --- keys ------------------------------------------------------------------------------


def _private_keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


PRIVATE = _private_keys()
OTHER_PRIVATE = _private_keys()  # the same kinds of key, not the gateway's
_TO_JWK: dict[str, Callable[..., Any]] = {
    "RS256": RSAAlgorithm.to_jwk,
    "ES256": ECAlgorithm.to_jwk,
    "EdDSA": OKPAlgorithm.to_jwk,
}


def public_jwk(algorithm: str, kid: str, keys: dict[str, Any] = PRIVATE) -> dict[str, Any]:
    jwk: dict[str, Any] = _TO_JWK[algorithm](keys[algorithm].public_key(), as_dict=True)
    return {**jwk, "kid": kid}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}))
    return path


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    return write_jwks(
        tmp_path / "jwks.json",
        *(public_jwk(alg, f"k-{alg}") for alg in ("RS256", "ES256", "EdDSA")),
    )


def signed_by(algorithm: str, claims: dict[str, Any], *, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return sign(claims, key=PRIVATE[algorithm], algorithm=algorithm, headers=headers)


def authenticator(**overrides: Any) -> Authenticator:
    return Authenticator(load_settings(**overrides))


def with_secret(**overrides: Any) -> Authenticator:
    return authenticator(jwt_secret=JWT_SECRET, **overrides)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- the Authenticator alone -------------------------------------------------------------


def test_without_settings_nothing_is_identified() -> None:
    auth = authenticator()
    assert not auth.enabled
    assert auth.identify(None) is None
    assert auth.identify("Bearer whatever, not even a token") is None


def test_a_token_names_the_role_and_carries_the_claims() -> None:
    claims = {"role": "reader", "sub": "ana", "n": 3, "https://x.example/tier": "gold"}
    identity = with_secret().identify("Bearer " + sign(claims))
    assert identity is not None
    assert identity.role == "reader"
    assert json.loads(identity.claims) == {**claims, "exp": json.loads(identity.claims)["exp"]}
    # the role first; single claims only for string values with usable names
    assert identity.commands[0] == b'SET LOCAL ROLE "reader"'
    assert identity.commands[1].startswith(b"SET LOCAL request.jwt.claims = E'{")
    assert identity.commands[2:] == (
        b"SET LOCAL request.jwt.claim.\"role\" = E'reader'",
        b"SET LOCAL request.jwt.claim.\"sub\" = E'ana'",
    )
    assert identity.role_bytes == b"reader"


def test_the_scheme_is_case_insensitive_and_the_token_trimmed() -> None:
    identity = with_secret().identify("  bearer   " + sign({"role": "r"}) + " ")
    assert identity is not None and identity.role == "r"


def test_the_role_claim_may_be_a_dotted_path() -> None:
    auth = with_secret(jwt_role_claim="app_metadata.role")
    token = sign({"role": "not this", "app_metadata": {"role": "this"}})
    identity = auth.identify("Bearer " + token)
    assert identity is not None and identity.role == "this"


def test_no_role_claim_means_the_anonymous_role_or_401() -> None:
    token = "Bearer " + sign({"sub": "ana"})
    identity = with_secret(anon_role="anon").identify(token)
    assert identity is not None and identity.role == "anon"
    assert json.loads(identity.claims)["sub"] == "ana"
    with pytest.raises(InvalidToken, match="names no role"):
        with_secret().identify(token)


def test_no_token_means_the_anonymous_role_or_401() -> None:
    anonymous = with_secret(anon_role="anon").identify(None)
    assert anonymous is not None and (anonymous.role, anonymous.claims) == ("anon", "{}")
    with pytest.raises(Unauthorized) as refused:
        with_secret().identify(None)
    assert refused.value.challenge == "Bearer"
    # an anonymous role alone: requests run as it, and any token is refused
    only_anon = authenticator(anon_role="anon")
    assert only_anon.identify(None).role == "anon"  # type: ignore[union-attr]
    with pytest.raises(InvalidToken, match="accepts no tokens"):
        only_anon.identify("Bearer " + sign({"role": "r"}))


@pytest.mark.parametrize(
    ("role", "why"),
    [("none", "SET ROLE none"), ("", "empty"), ("r" * 64, "longer than 63"), ("a\x00b", "NUL")],
)
def test_a_role_that_cannot_be_one_is_forbidden(role: str, why: str) -> None:
    with pytest.raises(ForbiddenRole, match=why):
        with_secret().identify("Bearer " + sign({"role": role}))


def test_a_role_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidToken, match="not a string"):
        with_secret().identify("Bearer " + sign({"role": ["a", "b"]}))


def test_the_anonymous_role_must_be_a_role_name() -> None:
    with pytest.raises(ConfigError, match="PGQG_ANON_ROLE"):
        authenticator(anon_role="none")


def _hostile_tokens() -> list[tuple[str, Callable[[], str], str]]:
    """(id, a token made at test time, the message the refusal gives)."""
    now = int(time.time())
    rsa_pem = (
        PRIVATE["RS256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    return [
        (
            "wrong-key",
            lambda: sign({"role": "r"}, key="another secret of 32 bytes or more!"),
            "signature",
        ),
        ("tampered", lambda: sign({"role": "r"})[:-4] + "AAAA", "signature"),
        ("expired", lambda: sign({"role": "r", "exp": now - 120}), "expired"),
        ("not-yet-valid", lambda: sign({"role": "r", "nbf": now + 120}), "not valid yet"),
        ("alg-none", lambda: jwt.encode({"role": "r"}, None, algorithm="none"), "algorithm"),
        ("alg-none-signed", lambda: _raw(b'{"alg":"none"}', sign({}).split(".")[2]), "algorithm"),
        ("rs256-for-a-secret", lambda: signed_by("RS256", {"role": "r"}), "algorithm"),
        # HS/RS confusion: the RSA public key's PEM as an HMAC secret
        ("hs256-by-public-key", lambda: _hmac_token(rsa_pem), "signature"),
        ("bad-base64", lambda: f"{header}.!!!.???", "malformed"),
        ("bad-json", lambda: _hmac_token(JWT_SECRET.encode(), b"{not json"), "malformed"),
        ("two-segments", lambda: f"{header}.{b64(b'{}')}", "malformed"),
        ("garbage", lambda: "x", "malformed"),
        ("payload-not-object", lambda: _hmac_token(JWT_SECRET.encode(), b"[1,2]"), "malformed"),
        ("huge", lambda: sign({"role": "r", "pad": "x" * MAX_TOKEN_BYTES}), "longer than"),
        ("not-ascii", lambda: sign({"role": "r"}) + "\u00e9", "malformed"),
    ]


def _raw(header: bytes, signature: str, payload: bytes = b'{"role":"r"}') -> str:
    return f"{b64(header)}.{b64(payload)}.{signature}"


def _hmac_token(secret: bytes, payload: bytes = b'{"role":"r"}') -> str:
    """A token signed by HMAC with any bytes as the secret (PyJWT refuses PEM ones)."""
    import hashlib
    import hmac

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


HOSTILE = _hostile_tokens()


@pytest.mark.parametrize(
    ("make", "message"), [(m, w) for _, m, w in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_tokens_are_refused(make: Callable[[], str], message: str) -> None:
    token = make()
    with pytest.raises(InvalidToken, match=message) as refused:
        with_secret(jwt_leeway_s=5).identify("Bearer " + token)
    assert token not in refused.value.message and token not in refused.value.challenge
    assert refused.value.challenge.startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc", "bearer\tabc"]
)
def test_an_authorization_header_that_is_not_bearer_is_refused(header: str) -> None:
    with pytest.raises(InvalidToken, match="Bearer, a space, the token"):
        with_secret(anon_role="anon").identify(header)


def test_the_leeway_allows_for_clock_skew() -> None:
    now = int(time.time())
    late = "Bearer " + sign({"role": "r", "exp": now - 10})
    early = "Bearer " + sign({"role": "r", "nbf": now + 10})
    for token in (late, early):
        assert with_secret(jwt_leeway_s=30).identify(token) is not None
        with pytest.raises(InvalidToken):
            with_secret(jwt_leeway_s=0).identify(token)


def test_the_audience_is_checked_when_configured() -> None:
    auth = with_secret(jwt_audience="bookshop")
    assert auth.identify("Bearer " + sign({"role": "r", "aud": "bookshop"})) is not None
    assert auth.identify("Bearer " + sign({"role": "r", "aud": ["x", "bookshop"]})) is not None
    with pytest.raises(InvalidToken, match="another audience"):
        auth.identify("Bearer " + sign({"role": "r", "aud": "elsewhere"}))
    with pytest.raises(InvalidToken, match="lacks a claim"):
        auth.identify("Bearer " + sign({"role": "r"}))
    # not configured: aud is not looked at (as PostgREST without jwt-aud)
    assert with_secret().identify("Bearer " + sign({"role": "r", "aud": "any"})) is not None


def test_hs384_and_hs512_need_a_secret_long_enough_for_them() -> None:
    long_secret = "s" * 64
    for algorithm in ("HS384", "HS512"):
        token = "Bearer " + sign({"role": "r"}, algorithm=algorithm, key=long_secret)
        assert authenticator(jwt_secret=long_secret).identify(token) is not None
        with pytest.raises(InvalidToken, match="algorithm"):
            authenticator(jwt_secret=long_secret[:40]).identify(token)


# --- the cache of verified tokens ---------------------------------------------------------


def test_a_verified_token_is_kept_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = with_secret(jwt_leeway_s=0)
    token = "Bearer " + sign({"role": "r"}, lifetime_s=60)
    first = auth.identify(token)
    calls = 0
    decode = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(auth_module.jwt, "decode", counting)
    assert auth.identify(token) is first  # the same object, not verified again
    assert calls == 0
    # once the cache's clock is past exp, the token is verified again (PyJWT's own
    # clock, not moved here, still finds it valid)
    later = time.time() + 61
    monkeypatch.setattr(auth_module.time, "time", lambda: later)
    assert auth.identify(token) is not first
    assert calls == 1


def test_a_refused_token_is_not_kept() -> None:
    auth = with_secret()
    token = "Bearer " + sign({"role": "none"})
    for _ in range(2):
        with pytest.raises(ForbiddenRole):
            auth.identify(token)
    assert not auth._verified


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "CACHED_TOKENS", 8)
    auth = with_secret()
    tokens = ["Bearer " + sign({"role": "r", "n": n}) for n in range(20)]
    for token in tokens:
        auth.identify(token)
    assert len(auth._verified) <= 8
    assert tokens[-1].removeprefix("Bearer ") in auth._verified


# --- JWKS files ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_jwks_keys_verify_their_own_algorithm(jwks_file: Path, algorithm: str) -> None:
    auth = authenticator(jwt_jwks_file=jwks_file)
    for kid in (f"k-{algorithm}", None):  # by kid, and without one by algorithm
        identity = auth.identify("Bearer " + signed_by(algorithm, {"role": "r"}, kid=kid))
        assert identity is not None and identity.role == "r"
    other = sign({"role": "r"}, key=OTHER_PRIVATE[algorithm], algorithm=algorithm)
    with pytest.raises(InvalidToken, match="signature"):
        auth.identify("Bearer " + other)


def test_jwks_refuses_what_its_keys_are_not_for(jwks_file: Path) -> None:
    auth = authenticator(jwt_jwks_file=jwks_file)
    with pytest.raises(InvalidToken, match="no key"):
        auth.identify("Bearer " + signed_by("RS256", {"role": "r"}, kid="unknown"))
    with pytest.raises(InvalidToken, match="no key"):  # a known kid, another algorithm
        auth.identify("Bearer " + signed_by("ES256", {"role": "r"}, kid="k-RS256"))
    with pytest.raises(InvalidToken, match="algorithm"):  # an HMAC token: no secret here
        auth.identify("Bearer " + sign({"role": "r"}))
    rsa_jwk = json.dumps(public_jwk("RS256", "k-RS256")).encode()
    with pytest.raises(InvalidToken, match="algorithm"):  # the public JWK as an HMAC secret
        auth.identify("Bearer " + _hmac_token(rsa_jwk))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "cannot read it as JSON"),
        ('{"keys": []}', "not a JWKS"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "private or symmetric"),
        ("PRIVATE", "private or symmetric"),
        ('{"keys": [{"kty": "RSA", "n": "x"}]}', "key 1"),
    ],
)
def test_an_unusable_jwks_file_is_refused_at_start(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "jwks.json"
    if content == "PRIVATE":
        content = RSAAlgorithm.to_jwk(PRIVATE["RS256"])
    path.write_text(content)
    with pytest.raises(ConfigError, match=problem):
        authenticator(jwt_jwks_file=path)
    with pytest.raises(ConfigError, match="cannot read"):
        authenticator(jwt_jwks_file=tmp_path / "missing.json")


def test_reload_reads_the_new_keys_and_forgets_tokens(tmp_path: Path, caplog: Any) -> None:
    path = write_jwks(tmp_path / "jwks.json", public_jwk("ES256", "old"))
    auth = authenticator(jwt_jwks_file=path)
    old = "Bearer " + signed_by("ES256", {"role": "r"}, kid="old")
    assert auth.identify(old) is not None
    new_private = ec.generate_private_key(ec.SECP256R1())
    new_jwk = {**ECAlgorithm.to_jwk(new_private.public_key(), as_dict=True), "kid": "new"}
    write_jwks(path, new_jwk)
    auth.reload()
    with pytest.raises(InvalidToken, match="no key"):
        auth.identify(old)  # not from the cache: its key is gone
    new = sign({"role": "r"}, key=new_private, algorithm="ES256", headers={"kid": "new"})
    assert auth.identify("Bearer " + new) is not None
    # a broken file keeps the keys there are, and says so
    path.write_text("{")
    with caplog.at_level(logging.ERROR, logger="gateway.auth"):
        auth.reload()
    assert "old keys stay" in caplog.text
    assert auth.identify("Bearer " + new) is not None


# --- through a gateway ----------------------------------------------------------------------


async def test_without_settings_an_authorization_header_changes_nothing(
    gateway_factory: ClientFactory,
) -> None:
    client = await gateway_factory()
    for headers in ({}, bearer("not a token"), {"Authorization": "Basic eDp5"}):
        resp = await client.post("/v1/query", json={"sql": "select 1 as one"}, headers=headers)
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/query", {"sql": "select 1"}),
        ("POST", "/v1/transaction", {"statements": [{"sql": "select 1"}], "read_only": True}),
        ("GET", "/v1/queries/anything", None),
        ("POST", "/v1/queries/anything", {"params": {}}),
    ],
)
async def test_every_endpoint_that_runs_sql_needs_a_token(
    gateway_factory: ClientFactory, method: str, path: str, body: Any
) -> None:
    client = await gateway_factory(jwt_secret=JWT_SECRET)
    resp = await client.request(method, path, json=body)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_error(await resp.json(), "unauthorized")
    bad = await client.request(method, path, json=body, headers=bearer("x.y.z"))
    assert bad.status == 401
    assert bad.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert_error(await bad.json(), "invalid_token")
    # the endpoints that run no SQL of the request's need none
    for free in ("/healthz", "/readyz", "/v1/stats", "/v1/queries", "/openapi.json"):
        assert (await client.get(free)).status == 200, free


async def test_hostile_tokens_get_401_and_the_gateway_keeps_serving(
    gateway_factory: ClientFactory, caplog: Any
) -> None:
    client = await gateway_factory(jwt_secret=JWT_SECRET, anon_role="pgqg_nobody_at_all")
    tokens = [make() for _, make, _ in HOSTILE]
    with caplog.at_level(logging.DEBUG):
        for token in tokens:
            resp = await client.post("/v1/query", json={"sql": "select 1"}, headers=bearer(token))
            text = await resp.text()
            assert resp.status == 401, text
            assert_error(json.loads(text), "invalid_token")
            assert token not in text and token not in resp.headers["WWW-Authenticate"]
        # a token too long for aiohttp's header limit is refused before any handler
        huge = await client.post(
            "/v1/query", json={"sql": "select 1"}, headers=bearer("x" * 10_000)
        )
        assert huge.status == 400
        stats = json.dumps(await get_stats(client))
    logged = caplog.text
    assert "LineTooLong in a header that holds a bearer token, not shown" in logged
    assert "xxxxxxxx" not in logged
    for token in tokens:
        if len(token) > 1:  # "x" is in any log
            assert token not in logged and token not in stats
    assert JWT_SECRET not in logged and JWT_SECRET not in stats
    assert (await client.get("/readyz")).status == 200


async def test_a_secret_never_appears_in_a_settings_error() -> None:
    with pytest.raises(ConfigError) as short:
        load_settings(jwt_secret="hunter2-is-too-short")
    assert "hunter2" not in str(short.value)
    assert "PGQG_JWT_SECRET: must be at least 32 bytes, not 20" in str(short.value)
    with pytest.raises(ConfigError) as both:
        load_settings(jwt_secret=JWT_SECRET, jwt_jwks_file="/x.json")
    assert JWT_SECRET not in str(both.value)
    assert "not both" in str(both.value)
    assert JWT_SECRET not in repr(load_settings(jwt_secret=JWT_SECRET))


def test_raw_sql_roles_need_roles() -> None:
    with pytest.raises(ConfigError, match="PGQG_RAW_SQL_ROLES needs"):
        load_settings(raw_sql_roles="a")
    assert load_settings(raw_sql_roles="a, b", anon_role="a").raw_sql_roles == ("a", "b")
    assert load_settings(raw_sql_roles=["a"], anon_role="a").raw_sql_roles == ("a",)


def test_a_log_line_that_quotes_a_bearer_token_does_not_show_it() -> None:
    """However aiohttp's record of an unparsable request was rewritten before (by
    `BadRequestsInOneLine`, which keeps the error's text), the token is not shown."""
    auth_module.keep_tokens_out_of_aiohttp_logs()
    (token_filter,) = [
        f for f in logging.getLogger("aiohttp.server").filters if "NoTokens" in type(f).__name__
    ]
    record = logging.LogRecord(
        "aiohttp.server",
        logging.INFO,
        __file__,
        1,
        "%s: 400 %s",
        ("Error", "b'Bearer eyJ.x'"),
        None,
    )
    assert token_filter.filter(record)
    assert record.getMessage() == "Error: 400 b'Bearer (not shown)'"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_rereads_the_jwks_file(
    database_dsn: str, tmp_path: Path, workers: int
) -> None:
    """A ``pgqg serve`` with a JWKS file: after the file gains a new key and loses the old
    one, SIGHUP makes the new key's tokens verify and the old one's fail, without a restart.
    With ``--workers`` the supervisor passes SIGHUP on to every worker."""
    path = write_jwks(tmp_path / "jwks.json", public_jwk("ES256", "old"))
    new_private = ec.generate_private_key(ec.SECP256R1())
    new_jwk = {**ECAlgorithm.to_jwk(new_private.public_key(), as_dict=True), "kid": "new"}
    claims = {"role": TEST_REQUEST_ROLE}
    old = bearer(signed_by("ES256", claims, kid="old"))
    new = bearer(sign(claims, key=new_private, algorithm="ES256", headers={"kid": "new"}))
    served = Served(database_dsn, "--workers", str(workers), env={"PGQG_JWT_JWKS_FILE": str(path)})
    # a connection per request, so that with workers the kernel may pick either
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await served.ready(http)

            async def statuses(headers: dict[str, str]) -> set[int]:
                """The answers to 20 requests, each on a connection of its own (all
                20 go to one of two workers once in half a million)."""
                body = {"sql": "select current_user"}
                answers = set()
                for _ in range(20):
                    async with http.post(served.url + "/v1/query", json=body, headers=headers) as r:
                        answers.add(r.status)
                return answers

            assert (await statuses(old), await statuses(new)) == ({200}, {401})
            write_jwks(path, new_jwk)
            served.proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(30):  # until every worker reread the file
                while (await statuses(new), await statuses(old)) != ({200}, {401}):
                    await asyncio.sleep(0.05)
            assert served.proc.poll() is None  # SIGHUP did not stop it
            served.proc.send_signal(signal.SIGTERM)
            assert await served.exit_code(timeout=30) == 0
    finally:
        served.stop()
