"""Device bearer tokens: who may push to and pull from which models.

A token is ``fdx1.<payload>.<signature>``: the payload is compact JSON, base64url without
padding; the signature is HMAC-SHA256 with the server's secret over ``fdx1.<payload>``,
base64url. The model server holds the secret and checks tokens without any state;
``fedex token issue`` mints them for devices and tools.

The payload has one strict schema, checked after the signature (a holder of the secret
can still mint a bad one, and the server must never guess what it meant):

- exactly the keys ``d``, ``m``, ``iat``, ``exp``; any other key is refused;
- ``d``: the device id, 1-128 characters of ``A-Z a-z 0-9 . _ : @ -``;
- ``m``: a non-empty JSON list of distinct model ids (same alphabet), or ``["*"]`` for
  every model; ``"*"`` never among ids, and never a bare string;
- ``iat`` / ``exp``: issued-at and expiry, non-negative integer Unix seconds (not floats,
  not strings, not booleans), ``iat < exp``.

Anything else is ``malformed`` (HTTP 401) with a message naming what was wrong.

Pure: no I/O, no clock (callers pass ``now``). Every failure is one :class:`AuthError`
with a machine-readable :class:`AuthReason`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import orjson

from pipeline.errors import FedexError

PREFIX: Final = "fdx1"
#: The model id that grants every model: ``issue_token(..., ANY_MODEL)``, ``"m": ["*"]``.
ANY_MODEL: Final = "*"
#: The payload's keys, all required, no others.
CLAIM_KEYS: Final = frozenset({"d", "m", "iat", "exp"})
#: Longest token accepted (a grant of a few hundred model ids); bounds the work per request.
MAX_TOKEN_CHARS: Final = 16 * 1024

_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_B64: Final = re.compile(r"[A-Za-z0-9_-]+")


class AuthReason(enum.StrEnum):
    """Why a request was refused. Stable strings: HTTP bodies carry them."""

    MISSING = "missing"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    FORBIDDEN_MODEL = "forbidden_model"
    FORBIDDEN_DEVICE = "forbidden_device"

    @property
    def is_forbidden(self) -> bool:
        """True: the token is valid but does not grant this (HTTP 403, not 401)."""
        return self in (AuthReason.FORBIDDEN_MODEL, AuthReason.FORBIDDEN_DEVICE)


class AuthError(FedexError):
    """A token is missing, malformed, forged, expired, or does not grant the request."""

    def __init__(self, reason: AuthReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants. ``models`` is None for every model (``["*"]``)."""

    device_id: str
    models: frozenset[str] | None
    issued_at: int
    expires_at: int

    def allows(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def require_model(self, model_id: str) -> None:
        """Raises ``AuthError(forbidden_model)`` unless the token grants ``model_id``."""
        if not self.allows(model_id):
            raise AuthError(
                AuthReason.FORBIDDEN_MODEL,
                f"the token of device {self.device_id!r} does not grant model {model_id!r}",
            )

    def require_device(self, device_id: str) -> None:
        """Raises ``AuthError(forbidden_device)`` unless the token was issued to ``device_id``."""
        if device_id != self.device_id:
            raise AuthError(
                AuthReason.FORBIDDEN_DEVICE,
                f"the token was issued to device {self.device_id!r}, not {device_id!r}",
            )


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise AuthError(AuthReason.MALFORMED, "the signing secret is empty; set FEDEX_AUTH_SECRET")
    return key


def _sign(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def issue_token(
    secret: str | bytes,
    device_id: str,
    models: Iterable[str] | str,
    ttl_s: float,
    now: float,
) -> str:
    """A token for ``device_id`` granting ``models`` (one id, ids, or ``"*"`` for all)
    until ``now + ttl_s``; its payload follows the module's schema (``"m"`` is always a
    list). Raises ValueError for an invalid id, ``"*"`` among ids, or a non-positive ttl."""
    if not _ID.fullmatch(device_id):
        raise ValueError(
            f"device id {device_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -"
        )
    if ttl_s <= 0:
        raise ValueError(f"ttl must be positive, got {ttl_s}")
    ids = [models] if isinstance(models, str) else list(models)
    if not ids:
        raise ValueError("a token must grant at least one model (or '*' for every model)")
    if ANY_MODEL in ids and len(set(ids)) > 1:
        raise ValueError("'*' grants every model and must stand alone, not among model ids")
    for model_id in ids:
        if model_id != ANY_MODEL and not _ID.fullmatch(model_id):
            raise ValueError(
                f"model id {model_id!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -"
            )
    grant = sorted(set(ids))
    issued = int(now)
    payload = {"d": device_id, "m": grant, "iat": issued, "exp": issued + max(1, int(ttl_s))}
    signed = f"{PREFIX}.{_b64encode(orjson.dumps(payload))}"
    return f"{signed}.{_b64encode(_sign(_key(secret), signed))}"


def verify_token(secret: str | bytes, token: str | None, now: float) -> Claims:
    """The claims of ``token`` if the server's ``secret`` signed it and it has not expired.

    The signature is compared in constant time before the payload is parsed, so a forged
    token learns nothing from how it fails.
    """
    if not token:
        raise AuthError(AuthReason.MISSING, "no bearer token; send 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(AuthReason.MALFORMED, f"token is longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise AuthError(
            AuthReason.MALFORMED, f"token is not of the form {PREFIX}.<payload>.<signature>"
        )
    try:
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error):
        raise AuthError(AuthReason.MALFORMED, "token signature is not base64url") from None
    signed = f"{parts[0]}.{parts[1]}"
    try:
        expected = _sign(_key(secret), signed)
    except UnicodeEncodeError:
        raise AuthError(AuthReason.MALFORMED, "token is not ASCII") from None
    if not hmac.compare_digest(signature, expected):
        raise AuthError(
            AuthReason.BAD_SIGNATURE,
            "token signature does not match: forged, or issued by another server",
        )
    try:
        payload = orjson.loads(_b64decode(parts[1]))
    except (ValueError, binascii.Error):
        raise AuthError(AuthReason.MALFORMED, "token payload is not base64url JSON") from None
    claims = _claims(payload)
    if now >= claims.expires_at:
        raise AuthError(
            AuthReason.EXPIRED,
            f"token of device {claims.device_id!r} expired at {claims.expires_at} "
            f"(now {int(now)}); issue a new one",
        )
    return claims


def _malformed(what: str) -> AuthError:
    return AuthError(
        AuthReason.MALFORMED, f"token payload {what}; issue a new token (fedex token issue)"
    )


def _time_claim(payload: dict[str, object], key: str) -> int:
    value = payload[key]
    # bool is an int subclass: true/false are not times.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(f"{key!r} must be an integer of Unix seconds, got {value!r}")
    if value < 0:
        raise _malformed(f"{key!r} must not be negative, got {value}")
    return value


def _claims(payload: object) -> Claims:
    """The claims of a signed payload, checked against the one schema (module docstring).

    Only a holder of the secret can have produced this payload, so a bad shape is a bug
    of the issuer; it is still refused as malformed, with what was wrong, never guessed at
    (a bare ``"*"`` once meant every model while a bare id meant none)."""
    if not isinstance(payload, dict):
        raise _malformed(f"must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload.keys() - CLAIM_KEYS)
    if unknown:
        raise _malformed(f"has unknown keys {unknown}; only d, m, iat, exp are allowed")
    missing = sorted(CLAIM_KEYS - payload.keys())
    if missing:
        raise _malformed(f"lacks {', '.join(map(repr, missing))}")
    device = payload["d"]
    if not isinstance(device, str) or not _ID.fullmatch(device):
        raise _malformed(
            f"'d' must be a device id of 1-128 characters of A-Z a-z 0-9 . _ : @ -, got {device!r}"
        )
    grant = payload["m"]
    if not isinstance(grant, list):
        raise _malformed(f"'m' must be a list of model ids (['*'] for every model), got {grant!r}")
    if not grant:
        raise _malformed("'m' must grant at least one model (['*'] for every model)")
    models: frozenset[str] | None
    if grant == [ANY_MODEL]:
        models = None
    else:
        for model_id in grant:
            if model_id == ANY_MODEL:
                raise _malformed("'m' has '*' among model ids; '*' must stand alone: ['*']")
            if not isinstance(model_id, str) or not _ID.fullmatch(model_id):
                raise _malformed(
                    f"'m' has {model_id!r}, not a model id of 1-128 characters of "
                    "A-Z a-z 0-9 . _ : @ -"
                )
        models = frozenset(grant)
        if len(models) != len(grant):
            raise _malformed("'m' names a model twice")
    iat, exp = _time_claim(payload, "iat"), _time_claim(payload, "exp")
    if iat >= exp:
        raise _malformed(f"'iat' ({iat}) must be before 'exp' ({exp})")
    return Claims(device_id=device, models=models, issued_at=iat, expires_at=exp)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if authorization is None or not authorization.strip():
        raise AuthError(
            AuthReason.MISSING, "no Authorization header; send 'Authorization: Bearer <token>'"
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError(AuthReason.MALFORMED, "Authorization must be 'Bearer <token>'")
    return token
