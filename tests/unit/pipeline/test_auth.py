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


# ------------------------------------------------------------------------ the schema


def _signed(payload: object, secret: str = SECRET) -> str:
    """A token over any payload, signed with the right secret: the schema alone decides."""
    import hashlib
    import hmac

    body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
    signed = f"fdx1.{body}"
    sig = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _payload(token: str) -> dict[str, object]:
    body = token.split(".")[1]
    decoded: dict[str, object] = orjson.loads(
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    )
    return decoded


GOOD = {"d": "dev-1", "m": ["faces"], "iat": NOW, "exp": NOW + 60}


def test_issued_payloads_follow_the_schema() -> None:
    """``m`` is always a list: ``["*"]`` for every model, the sorted ids otherwise."""
    assert _payload(issue_token(SECRET, "d", ANY_MODEL, 60, NOW)) == {
        "d": "d",
        "m": ["*"],
        "iat": NOW,
        "exp": NOW + 60,
    }
    assert _payload(issue_token(SECRET, "d", "faces", 60, NOW))["m"] == ["faces"]
    assert _payload(issue_token(SECRET, "d", ["b", "a", "b"], 60, NOW))["m"] == ["a", "b"]
    assert verify_token(SECRET, _signed(GOOD), NOW) == Claims(
        "dev-1", frozenset({"faces"}), NOW, NOW + 60
    )
    assert verify_token(SECRET, _signed({**GOOD, "m": ["*"]}), NOW).models is None


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"m": "*"}, "'m' must be a list"),  # the wildcard as a bare string
        ({"m": "faces"}, "'m' must be a list"),
        ({"m": []}, "at least one"),
        ({"m": ["*", "faces"]}, "'*'"),
        ({"m": ["faces", "faces"]}, "twice"),
        ({"m": [1]}, "model id"),
        ({"m": ["bad/id"]}, "model id"),
        ({"m": None}, "'m' must be a list"),
        ({"d": ""}, "device id"),
        ({"d": 7}, "device id"),
        ({"iat": "1700000000"}, "'iat' must be an integer"),
        ({"iat": float(NOW)}, "'iat' must be an integer"),
        ({"exp": True}, "'exp' must be an integer"),
        ({"iat": -1}, "'iat'"),
        ({"iat": NOW + 61}, "before"),
        ({"exp": NOW}, "before"),
        ({"x": 1}, "unknown"),
        ({"admin": True}, "unknown"),
    ],
)
def test_every_schema_violation_is_malformed_and_named(
    change: dict[str, object], complaint: str
) -> None:
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, _signed({**GOOD, **change}), NOW)
    assert info.value.reason is AuthReason.MALFORMED
    assert complaint in info.value.message, info.value.message


@pytest.mark.parametrize("missing", ["d", "m", "iat", "exp"])
def test_a_missing_claim_is_malformed_and_named(missing: str) -> None:
    payload = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, _signed(payload), NOW)
    assert info.value.reason is AuthReason.MALFORMED
    assert repr(missing) in info.value.message, info.value.message


@pytest.mark.parametrize("payload", [[1, 2], "x", 3, None])
def test_a_payload_that_is_not_an_object_is_malformed(payload: object) -> None:
    assert _reason(SECRET, _signed(payload)) is AuthReason.MALFORMED


def test_issue_refuses_the_wildcard_among_ids() -> None:
    with pytest.raises(ValueError, match="alone"):
        issue_token(SECRET, "d", ["*", "m1"], 60, NOW)


def test_token_issue_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("FEDEX_AUTH_SECRET", SECRET)
    runner = CliRunner()
    every = runner.invoke(app, ["token", "issue", "--device", "d", "--model", "*"])
    assert every.exit_code == 0, every.output
    assert verify_token(SECRET, every.output.strip(), NOW).models is None
    two = runner.invoke(app, ["token", "issue", "--device", "d", "--model", "b", "--model", "a"])
    assert _payload(two.output.strip())["m"] == ["a", "b"]
    mixed = runner.invoke(app, ["token", "issue", "--device", "d", "--model", "*", "--model", "a"])
    assert mixed.exit_code != 0 and "alone" in mixed.output
