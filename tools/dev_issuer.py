"""A local stand-in for Entra ID: signs RS256 access tokens and serves their JWKS on loopback.

    python -m tools.dev_issuer serve [--port 7073]
    python -m tools.dev_issuer token --caller alice --roles Gateway.Standard [--version 1|2] ...

The key pair lives in ``.local/dev-issuer/`` (git-ignored) so ``serve`` and ``token`` agree
across runs. Tests use ``DevIssuer()`` (in memory) and ``JwksServer`` (background thread,
free port, ``failing`` switch to simulate an outage). Never use these keys anywhere real.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DEFAULT_TENANT = "00000000-0000-4000-8000-000000000de0"
DEFAULT_AUDIENCE = "api://ai-gateway-local"
DEFAULT_PORT = 7073
DEFAULT_KEY_DIR = Path(__file__).resolve().parent.parent / ".local" / "dev-issuer"
_NAMESPACE = uuid.UUID("6f1c8a52-3d1e-4b8e-9a59-0d3c6a9e0a11")  # fixed: caller names map to stable app ids


def app_id_for(caller: str) -> str:
    """A GUID-like client id derived from a caller name, stable across tokens and runs."""
    return str(uuid.uuid5(_NAMESPACE, f"app:{caller}"))


def object_id_for(name: str, kind: str = "user") -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{kind}:{name}"))


def v1_issuer(tenant: str) -> str:
    return f"https://sts.windows.net/{tenant}/"


def v2_issuer(tenant: str) -> str:
    return f"https://login.microsoftonline.com/{tenant}/v2.0"


class DevIssuer:
    """An RSA-2048 signing key with a kid; mints Entra-shaped access tokens."""

    def __init__(self, key_dir: Path | None = None, *, tenant: str = DEFAULT_TENANT, audience: str = DEFAULT_AUDIENCE):
        self.key_dir = key_dir
        self.tenant = tenant
        self.audience = audience
        self._key = (_load_key(key_dir) if key_dir else None) or _new_key(key_dir)
        self._previous: list[rsa.RSAPrivateKey] = []  # still published after rotate(), as Entra does

    @property
    def kid(self) -> str:
        return _kid(self._key)

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self._key

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def rotate(self, keep_previous: bool = True) -> str:
        """Switch to a new signing key; returns its kid. The old key stays in the JWKS unless told otherwise."""
        self._previous = [self._key, *self._previous] if keep_previous else []
        self._key = _new_key(self.key_dir)
        return self.kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [_jwk(key) for key in (self._key, *self._previous)]}

    def openid_configuration(self, base_url: str) -> dict[str, Any]:
        return {
            "issuer": v2_issuer(self.tenant), "jwks_uri": f"{base_url}/keys",
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def claims(
        self, caller: str = "alice", roles: Iterable[str] = ("Gateway.Standard",), scopes: Iterable[str] = (),
        user: str | None = None, tenant: str | None = None, audience: str | None = None,
        version: int = 2, ttl: int = 3600, now: float | None = None,
    ) -> dict[str, Any]:
        """Claims shaped like a real Entra access token (app-only, or delegated when scopes/user are given)."""
        tid, issued = tenant or self.tenant, int(time.time() if now is None else now)
        scopes, roles = list(scopes), list(roles)
        delegated = bool(scopes) or user is not None
        oid = (user or object_id_for(caller)) if delegated else object_id_for(caller, "service-principal")
        claims: dict[str, Any] = {
            "aud": audience or self.audience, "iss": v2_issuer(tid) if version == 2 else v1_issuer(tid),
            "iat": issued, "nbf": issued, "exp": issued + ttl, "tid": tid, "oid": oid, "sub": oid,
            "uti": uuid.uuid4().hex[:22], "ver": "2.0" if version == 2 else "1.0",
        }
        claims.update({"azp": app_id_for(caller), "azpacr": "1"} if version == 2
                      else {"appid": app_id_for(caller), "appidacr": "1", "app_displayname": caller})
        if roles:
            claims["roles"] = roles
        if delegated:
            claims["scp"] = " ".join(scopes or ["Gateway.Invoke"])
            claims["name"] = caller
        return claims

    def token(self, overrides: dict[str, Any] | None = None, *, headers: dict[str, Any] | None = None,
              **claim_args: Any) -> str:
        """A signed RS256 token; ``overrides`` replace claims (a value of None removes the claim)."""
        claims = self.claims(**claim_args)
        for name, value in (overrides or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return self.sign(claims, headers=headers)

    def sign(self, claims: dict[str, Any], *, headers: dict[str, Any] | None = None, algorithm: str = "RS256") -> str:
        header = {"kid": self.kid, "typ": "JWT", **(headers or {})}
        return jwt.encode(claims, self._key, algorithm=algorithm, headers=header)


def _new_key(key_dir: Path | None) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_dir is not None:
        key_dir.mkdir(parents=True, exist_ok=True)
        path = key_dir / "signing-key.pem"
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        path.chmod(0o600)
    return key


def _load_key(key_dir: Path) -> rsa.RSAPrivateKey | None:
    path = key_dir / "signing-key.pem"
    if not path.exists():
        return None
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def _jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    # Like Entra's published keys: kty/use/kid/n/e, and no "alg".
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {"kty": "RSA", "use": "sig", "kid": _kid(key), "n": public["n"], "e": public["e"]}


def _kid(key: rsa.RSAPrivateKey) -> str:
    """RFC 7638 thumbprint: the kid follows the key, so a key reloaded from disk keeps its kid."""
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    canonical = json.dumps({"e": public["e"], "kty": "RSA", "n": public["n"]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


class JwksServer:
    """Serves an issuer's JWKS and OpenID configuration from a background thread on a free loopback port.

    ``failing = True`` makes both endpoints answer 503, as during an identity-provider outage.
    ``hits`` counts JWKS requests, so tests can pin down refetch rate limits.
    """

    def __init__(self, issuer: DevIssuer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.issuer = issuer
        self.failing = False
        self.hits = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.base_url = f"http://{host}:{self._socket.getsockname()[1]}"
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/keys"

    @property
    def openid_config_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def keys(_: Request) -> JSONResponse:
            self.hits += 1
            return self._answer(self.issuer.jwks())

        async def openid(_: Request) -> JSONResponse:
            return self._answer(self.issuer.openid_configuration(self.base_url))

        return Starlette(routes=[Route("/keys", keys), Route("/.well-known/openid-configuration", openid)])

    def _answer(self, body: dict[str, Any]) -> Any:
        from starlette.responses import JSONResponse

        if self.failing:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def run(self, log_level: str = "info") -> None:
        """Serve in the foreground until interrupted (the CLI)."""
        self._uvicorn(log_level).run(sockets=[self._socket])

    def start(self) -> JwksServer:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._server = self._uvicorn("warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("dev issuer JWKS server did not start")
            time.sleep(0.01)
        return self

    def _uvicorn(self, log_level: str) -> Any:
        import uvicorn

        config = uvicorn.Config(self.app(), log_level=log_level, lifespan="off", ws="none", access_log=False)
        return uvicorn.Server(config)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    issuer = DevIssuer(Path(args.key_dir), tenant=args.tenant)
    if args.command == "serve":
        _serve(issuer, args.port)
        return
    print(issuer.token(
        caller=args.caller, roles=_split(args.roles), scopes=_split(args.scopes), user=args.user,
        audience=args.audience, version=args.version, ttl=args.ttl,
    ))


def _serve(issuer: DevIssuer, port: int) -> None:
    server = JwksServer(issuer, port=port)
    print(f"dev issuer: JWKS {server.jwks_url}, OpenID {server.openid_config_url}, kid {issuer.kid}", flush=True)
    server.run()


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.replace(" ", ",").split(",") if item.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.dev_issuer", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--key-dir", default=str(DEFAULT_KEY_DIR), help="where the signing key is kept")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="serve /keys and /.well-known/openid-configuration")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant named by the OpenID configuration's issuer")
    token = sub.add_parser("token", parents=[common], help="print a signed access token")
    token.add_argument("--caller", default="alice", help="client application name; maps to a stable app id")
    token.add_argument("--roles", default="Gateway.Standard", help="comma-separated app roles ('' for none)")
    token.add_argument("--scopes", default="", help="comma-separated delegated scopes (makes a delegated token)")
    token.add_argument("--user", default=None, help="user object id (makes a delegated token)")
    token.add_argument("--tenant", default=DEFAULT_TENANT)
    token.add_argument("--audience", default=DEFAULT_AUDIENCE)
    token.add_argument("--version", type=int, choices=(1, 2), default=2)
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    return parser


if __name__ == "__main__":
    main()
