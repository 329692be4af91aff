"""Who is calling: an API key (a shared secret), or a JWT bearer token signed by a key the
device trusts (PyJWT), both sent as `Authorization: Bearer <credential>`.

The algorithm of a token is never taken from the token: it follows from the configured public
key's type (Ed25519 → EdDSA, EC P-256 → ES256, RSA ≥ 2048 bits → RS256), so no token can
choose HS256 with the public key as its secret, or `none`. Every token must carry `exp`;
`aud` and `iss` are checked when configured. A small leeway absorbs the clock drift of a
device that has been offline.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from edge_runtime.config import ServerConfig
from edge_runtime.errors import ConfigError

JWT_LEEWAY_S = 30
"""Seconds a token's `exp`/`nbf`/`iat` may be off: device clocks drift while offline."""
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    method: str
    """`api_key` or `jwt`."""
    subject: str | None = None
    """The token's `sub`, for the access log; None for the API key."""


class AuthError(Exception):
    """A credential was presented and refused; the message says why (never the secret)."""


class Authenticator:
    def __init__(
        self,
        api_key: str | None = None,
        jwt_key: Any = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self._jwt_key = jwt_key
        self._algorithm = _algorithm(jwt_key) if jwt_key is not None else ""
        self._audience = audience
        self._issuer = issuer

    @classmethod
    def from_config(cls, server: ServerConfig) -> Authenticator | None:
        """None when neither an API key nor a JWT key is configured (the API is open)."""
        api_key = server.resolved_api_key()
        jwt_key = None
        if server.jwt_public_key_file is not None:
            jwt_key = load_jwt_key(server.jwt_public_key_file)
        if api_key is None and jwt_key is None:
            return None
        return cls(api_key, jwt_key, server.jwt_audience, server.jwt_issuer)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this Authorization header, or AuthError."""
        if not authorization:
            raise AuthError(f"missing credentials: send 'Authorization: Bearer <{self._what}>'")
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise AuthError(f"expected 'Authorization: Bearer <{self._what}>'")
        # Constant-time comparison: the key must not leak through response timing.
        raw = given.encode("utf-8", "replace")
        if self._api_key is not None and hmac.compare_digest(raw, self._api_key):
            return Principal("api_key")
        if self._jwt_key is not None and given.count(".") == 2:
            return self._verify_jwt(given)
        raise AuthError(f"invalid {self._what}")

    @property
    def _what(self) -> str:
        return {(True, False): "API key", (False, True): "JWT"}.get(
            (self._api_key is not None, self._jwt_key is not None), "API key or JWT"
        )

    def _verify_jwt(self, token: str) -> Principal:
        import jwt  # PyJWT: only a daemon that accepts tokens needs it

        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=JWT_LEEWAY_S,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid JWT: {e}") from None
        sub = claims.get("sub")
        return Principal("jwt", sub if isinstance(sub, str) else None)


def load_jwt_key(path: Path) -> Any:
    """The public key of server.jwt_public_key_file, or ConfigError saying what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read server.jwt_public_key_file: {e}") from e
    try:
        key = load_pem_public_key(data)
    except ValueError as e:
        raise ConfigError(
            f"server.jwt_public_key_file {path} is not a PEM public key: {e}"
        ) from None
    _algorithm(key, path)
    return key


def _algorithm(key: Any, path: Path | None = None) -> str:
    where = f"server.jwt_public_key_file {path}" if path else "the JWT key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        raise ConfigError(f"{where}: EC keys must be P-256 (ES256), got {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA key of {key.key_size} bits; at least 2048")
        return "RS256"
    raise ConfigError(f"{where}: {type(key).__name__} is not Ed25519, EC P-256 or RSA")
