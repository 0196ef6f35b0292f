"""Authentication against crafted ASGI scopes: API keys, JWT (RS256/ES256/EdDSA/HS256, JWKS file and
URL with rotation), trusted headers. Failures carry a reason and never the secret."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vllm_audit.access import build_authenticator
from vllm_audit.access.apikeys import KeyStore
from vllm_audit.access.identity import Identity
from vllm_audit.config import Config, load_config


def scope(
    headers: dict[str, str] | None = None, client: tuple[str, int] | None = ("203.0.113.9", 5555)
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": client,
    }


def cfg(tmp_path: Path, access: dict[str, Any]) -> Config:
    return load_config(None, {"log": {"dir": str(tmp_path / "log")}, "access": access})


# -- API keys -------------------------------------------------------------------------------------


async def test_api_keys_hashed_revocable_at_once(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys.json"
    store = KeyStore(keyfile)
    key, entry = store.add("alice", "acme", ("user",))
    assert key not in keyfile.read_text() and entry.sha256 in keyfile.read_text()
    assert keyfile.stat().st_mode & 0o077 == 0
    auth = build_authenticator(cfg(tmp_path, {"auth": "api_key", "api_keys": {"file": str(keyfile)}}))
    assert auth is not None
    ident = await auth.authenticate(scope({"authorization": f"Bearer {key}"}))
    assert ident == Identity("alice", "acme", ("user",), "authenticated", "api_key", entry.key_id, None)
    assert (await auth.authenticate(scope({"x-api-key": key}))).user_id == "alice"

    # Another process (the CLI) revokes it: the running authenticator refuses the very next call.
    KeyStore(keyfile).revoke(entry.key_id)
    ident = await auth.authenticate(scope({"authorization": f"Bearer {key}"}))
    assert (ident.auth_status, ident.failure_reason, ident.key_id) == ("failed", "revoked API key", entry.key_id)

    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for headers, reason in [
        ({"authorization": f"Bearer {forged}"}, "unknown API key"),
        ({"authorization": "Bearer vak_000000000000_" + "x" * 43}, "unknown API key"),
        ({"authorization": "Bearer hunter2"}, "malformed API key"),
        ({"authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, "unsupported authorization scheme"),
        ({}, "missing credentials"),
    ]:
        ident = await auth.authenticate(scope(headers))
        assert ident.auth_status == "failed" and ident.failure_reason == reason, headers
        assert "hunter2" not in repr(ident) and forged not in repr(ident)


async def test_expired_api_key(tmp_path: Path) -> None:
    import datetime as dt

    keyfile = tmp_path / "keys.json"
    key, _ = KeyStore(keyfile).add("bob", "acme", (), expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    auth = build_authenticator(cfg(tmp_path, {"auth": "api_key", "api_keys": {"file": str(keyfile)}}))
    assert auth is not None
    assert (await auth.authenticate(scope({"x-api-key": key}))).failure_reason == "expired API key"


def test_auth_none_builds_nothing(tmp_path: Path) -> None:
    assert build_authenticator(cfg(tmp_path, {})) is None
    assert Identity.anonymous() == Identity("anonymous", "unknown", (), "anonymous", "none", None, None)


# -- JWT ------------------------------------------------------------------------------------------

ISS, AUD = "https://idp.test/", "vllm"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "sub": "alice",
        "org_id": "acme",
        "roles": ["user"],
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def jwk_of(private: Any, kid: str, alg: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
    d.update(kid=kid, alg=alg, use="sig")
    return d


KEYS: dict[str, Any] = {
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}


def jwks_file(tmp_path: Path, keys: dict[str, Any]) -> Path:
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps({"keys": [jwk_of(k, f"kid-{alg}", alg) for alg, k in keys.items()]}))
    return p


def jwt_cfg(tmp_path: Path, **jw: Any) -> Config:
    base = {"algorithms": ["RS256", "ES256", "EdDSA", "HS256"], "issuer": ISS, "audience": [AUD], "leeway_s": 5}
    base.update(jw)
    return cfg(tmp_path, {"auth": "jwt", "jwt": base})


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_jwt_asymmetric_from_jwks_file(tmp_path: Path, alg: str) -> None:
    auth = build_authenticator(jwt_cfg(tmp_path, jwks_file=str(jwks_file(tmp_path, KEYS))))
    assert auth is not None
    tok = jwt.encode(claims(), KEYS[alg], algorithm=alg, headers={"kid": f"kid-{alg}"})
    ident = await auth.authenticate(scope({"authorization": f"Bearer {tok}"}))
    assert ident == Identity("alice", "acme", ("user",), "authenticated", "jwt", None, None)


async def test_jwt_failures_have_reasons(tmp_path: Path) -> None:
    secret = tmp_path / "hs.secret"
    secret.write_text("s" * 40 + "\n")
    auth = build_authenticator(jwt_cfg(tmp_path, jwks_file=str(jwks_file(tmp_path, KEYS)), hs_secret_file=str(secret)))
    assert auth is not None
    rs = KEYS["RS256"]

    def tok(c: dict[str, Any], key: Any = rs, alg: str = "RS256", kid: str | None = "kid-RS256") -> str:
        return jwt.encode(c, key, algorithm=alg, headers={"kid": kid} if kid else None)

    good = tok(claims())
    h, p, s = good.split(".")
    tampered_payload = jwt.utils.base64url_encode(json.dumps(claims(sub="mallory")).encode()).decode()
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    cases = {
        "expired token": tok(claims(exp=now - 60)),
        "wrong audience": tok(claims(aud="someone-else")),
        "wrong issuer": tok(claims(iss="https://evil.test/")),
        "token not yet valid": tok(claims(nbf=now + 120)),
        "invalid token signature": f"{h}.{tampered_payload}.{s}",
        "token lacks the exp claim": tok(claims(exp=None)),
        "token lacks the org_id claim": tok(claims(org_id=None)),
        "unknown signing key": tok(claims(), other_rsa, kid="kid-unknown"),
        "malformed token": "eyJhbGciOiJSUzI1NiJ9.garbage.zzz",
        "token algorithm not allowed": jwt.encode(claims(), None, algorithm="none"),  # type: ignore[arg-type]
    }
    cases["invalid token signature"] = f"{h}.{tampered_payload}.{s}"
    for reason, token in cases.items():
        ident = await auth.authenticate(scope({"authorization": f"Bearer {token}"}))
        assert (ident.auth_status, ident.failure_reason) == ("failed", reason), reason
        assert token not in repr(ident)
    # Within the leeway is fine; HS256 with the shared secret works; HS256 signed with an RSA public
    # key (algorithm confusion) does not.
    assert (await auth.authenticate(scope({"authorization": f"Bearer {tok(claims(exp=now - 2))}"}))).ok
    hs = jwt.encode(claims(), "s" * 40, algorithm="HS256")
    assert (await auth.authenticate(scope({"authorization": f"Bearer {hs}"}))).ok
    wrong_hs = jwt.encode(claims(), "t" * 40, algorithm="HS256")
    ident = await auth.authenticate(scope({"authorization": f"Bearer {wrong_hs}"}))
    assert ident.failure_reason == "invalid token signature"


async def test_jwt_claim_names_are_configurable(tmp_path: Path) -> None:
    auth = build_authenticator(
        jwt_cfg(
            tmp_path,
            jwks_file=str(jwks_file(tmp_path, KEYS)),
            user_claim="email",
            org_claim="tenant",
            roles_claim="scope",
        )
    )
    assert auth is not None
    t = jwt.encode(
        claims(email="a@acme.test", tenant="acme", scope="user org_auditor"),
        KEYS["ES256"],
        algorithm="ES256",
        headers={"kid": "kid-ES256"},
    )
    ident = await auth.authenticate(scope({"authorization": f"Bearer {t}"}))
    assert (ident.user_id, ident.org_id, ident.roles) == ("a@acme.test", "acme", ("user", "org_auditor"))


async def test_jwks_url_cached_and_rotated_on_unknown_kid(tmp_path: Path) -> None:
    state: dict[str, Any] = {"keys": {"k1": KEYS["RS256"]}, "hits": 0}

    async def handler(request: web.Request) -> web.Response:
        state["hits"] += 1
        return web.json_response({"keys": [jwk_of(k, kid, "RS256") for kid, k in state["keys"].items()]})

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        auth = build_authenticator(
            jwt_cfg(
                tmp_path, jwks_url=f"http://127.0.0.1:{port}/jwks.json", jwks_min_refetch_s=0.2, jwks_cache_ttl_s=300
            )
        )
        assert auth is not None
        t1 = jwt.encode(claims(), KEYS["RS256"], algorithm="RS256", headers={"kid": "k1"})
        for _ in range(3):
            assert (await auth.authenticate(scope({"authorization": f"Bearer {t1}"}))).ok
        assert state["hits"] == 1  # cached
        # The IdP rotates to k2: the first token with kid k2 triggers one refetch.
        new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        state["keys"] = {"k1": KEYS["RS256"], "k2": new}
        await asyncio.sleep(0.25)
        t2 = jwt.encode(claims(), new, algorithm="RS256", headers={"kid": "k2"})
        assert (await auth.authenticate(scope({"authorization": f"Bearer {t2}"}))).ok
        assert state["hits"] == 2
        # Unknown kids cannot make us hammer the IdP: refetches are rate limited.
        bogus = jwt.encode(claims(), new, algorithm="RS256", headers={"kid": "nope"})
        await asyncio.sleep(0.25)
        for _ in range(5):
            assert (await auth.authenticate(scope({"authorization": f"Bearer {bogus}"}))).failure_reason == (
                "unknown signing key"
            )
        assert state["hits"] == 3
    finally:
        await runner.cleanup()


async def test_api_key_plus_jwt(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys.json"
    key, _ = KeyStore(keyfile).add("bob", "acme", ("user",))
    auth = build_authenticator(
        cfg(
            tmp_path,
            {
                "auth": "api_key+jwt",
                "api_keys": {"file": str(keyfile)},
                "jwt": {"jwks_file": str(jwks_file(tmp_path, KEYS)), "issuer": ISS, "audience": [AUD]},
            },
        )
    )
    assert auth is not None
    t = jwt.encode(claims(), KEYS["EdDSA"], algorithm="EdDSA", headers={"kid": "kid-EdDSA"})
    assert (await auth.authenticate(scope({"authorization": f"Bearer {t}"}))).auth_method == "jwt"
    assert (await auth.authenticate(scope({"authorization": f"Bearer {key}"}))).auth_method == "api_key"


# -- trusted headers ------------------------------------------------------------------------------


async def test_trusted_header_only_from_trusted_proxies(tmp_path: Path) -> None:
    auth = build_authenticator(
        cfg(tmp_path, {"auth": "trusted_header", "trusted_header": {"trusted_proxies": ["10.1.0.0/16", "::1/128"]}})
    )
    assert auth is not None
    hdrs = {"x-auth-user": "alice", "x-auth-org": "acme", "x-auth-roles": "user, org_auditor"}
    ident = await auth.authenticate(scope(hdrs, client=("10.1.2.3", 1)))
    assert ident == Identity("alice", "acme", ("user", "org_auditor"), "trusted_header", "header", None, None)
    assert (await auth.authenticate(scope(hdrs, client=("::1", 1)))).ok
    for client in [("10.2.0.1", 1), ("203.0.113.5", 1), None]:
        ident = await auth.authenticate(scope(hdrs, client=client))
        assert (ident.auth_status, ident.failure_reason) == ("failed", "identity headers from an untrusted peer")
    ident = await auth.authenticate(scope({"x-auth-user": "alice"}, client=("10.1.2.3", 1)))
    assert ident.failure_reason == "missing identity headers"
