"""Device tokens: issue, verify, and every way a token is refused."""

from __future__ import annotations

import base64

import orjson
import pytest

from pipeline.auth import (
    ANY_MODEL,
    AuthError,
    AuthReason,
    Claims,
    bearer_token,
    issue_token,
    verify_token,
)
from pipeline.errors import FedexError

SECRET = "s3cret-for-tests"
NOW = 1_700_000_000


def _reason(secret: str, token: str | None, now: float = NOW) -> AuthReason:
    with pytest.raises(AuthError) as info:
        verify_token(secret, token, now)
    return info.value.reason


def test_round_trip_grants_the_listed_models() -> None:
    token = issue_token(SECRET, "dev-1", ["m2", "m1", "m1"], ttl_s=60, now=NOW)
    claims = verify_token(SECRET, token, NOW + 59)
    assert claims == Claims("dev-1", frozenset({"m1", "m2"}), NOW, NOW + 60)
    assert claims.allows("m1") and claims.allows("m2") and not claims.allows("m3")
    claims.require_model("m1")
    claims.require_device("dev-1")


def test_wildcard_grants_every_model() -> None:
    claims = verify_token(SECRET, issue_token(SECRET, "tool", ANY_MODEL, 60, NOW), NOW)
    assert claims.models is None and claims.allows("anything:v@1")


def test_single_model_string_is_one_model() -> None:
    claims = verify_token(SECRET, issue_token(SECRET, "d", "faces-1", 60, NOW), NOW)
    assert claims.models == frozenset({"faces-1"})


def test_token_is_url_safe_and_compact() -> None:
    token = issue_token(SECRET, "dev-000042", ["faces-1"], 7 * 24 * 3600, NOW)
    assert token.startswith("fdx1.")
    assert all(c.isalnum() or c in "._-" for c in token)
    assert len(token) < 160


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: str | None) -> None:
    assert _reason(SECRET, token) is AuthReason.MISSING


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "fdx1.only-two",
        "fdx2.abc.def",
        "fdx1.abc.def.ghi",
        "fdx1.abc.not base64!",
        "fdx1.abc.é",
        "x" * 20_000,
    ],
)
def test_malformed(token: str) -> None:
    assert _reason(SECRET, token) is AuthReason.MALFORMED


def test_forged_with_another_secret() -> None:
    token = issue_token("other-secret", "dev-1", ["m1"], 60, NOW)
    assert _reason(SECRET, token) is AuthReason.BAD_SIGNATURE


def test_tampered_payload_breaks_the_signature() -> None:
    prefix, payload, signature = issue_token(SECRET, "dev-1", ["m1"], 60, NOW).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["m"] = "*"  # widen the grant
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    assert _reason(SECRET, f"{prefix}.{forged}.{signature}") is AuthReason.BAD_SIGNATURE


def test_signed_garbage_payload_is_malformed() -> None:
    """Only the secret's holder can sign, but a bad payload must still not crash."""
    import hashlib
    import hmac

    payload = base64.urlsafe_b64encode(b'{"d": 1}').rstrip(b"=").decode()
    signed = f"fdx1.{payload}"
    sig = hmac.new(SECRET.encode(), signed.encode(), hashlib.sha256).digest()
    token = f"{signed}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    assert _reason(SECRET, token) is AuthReason.MALFORMED


def test_expired_at_exactly_the_expiry() -> None:
    token = issue_token(SECRET, "dev-1", ["m1"], 60, NOW)
    verify_token(SECRET, token, NOW + 59.9)
    assert _reason(SECRET, token, NOW + 60) is AuthReason.EXPIRED


def test_forbidden_model_and_device_are_403_reasons() -> None:
    claims = verify_token(SECRET, issue_token(SECRET, "dev-1", ["m1"], 60, NOW), NOW)
    with pytest.raises(AuthError) as info:
        claims.require_model("m2")
    assert info.value.reason is AuthReason.FORBIDDEN_MODEL and info.value.reason.is_forbidden
    with pytest.raises(AuthError) as info:
        claims.require_device("dev-2")
    assert info.value.reason is AuthReason.FORBIDDEN_DEVICE and info.value.reason.is_forbidden
    assert not AuthReason.EXPIRED.is_forbidden
    assert isinstance(info.value, FedexError)


@pytest.mark.parametrize(
    ("device", "models", "ttl"),
    [("bad id!", ["m"], 60), ("d", ["bad/model"], 60), ("d", [], 60), ("d", ["m"], 0)],
)
def test_issue_rejects_bad_input(device: str, models: list[str], ttl: float) -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, device, models, ttl, NOW)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(AuthError):
        issue_token("", "d", ["m"], 60, NOW)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc")],
)
def test_bearer_header(header: str, expected: str) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, AuthReason.MISSING),
        ("  ", AuthReason.MISSING),
        ("Basic dXNlcjpwYXNz", AuthReason.MALFORMED),
        ("Bearer", AuthReason.MALFORMED),
        ("Bearer a b", AuthReason.MALFORMED),
    ],
)
def test_bad_bearer_header(header: str | None, reason: AuthReason) -> None:
    with pytest.raises(AuthError) as info:
        bearer_token(header)
    assert info.value.reason is reason
