"""The model server's HTTP shapes: JSON errors, path-id validation, registry views. Pure."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Final

import orjson
from aiohttp import web

from pipeline import codec
from pipeline.reasons import PushReason
from pipeline.records import FeaturePush, ModelUpdate
from pipeline.registry import ModelEntry
from pipeline.samples import ModelFit, Refusal, admit_push

#: Model ids and versions in paths: the wire format's id alphabet, and never only dots.
PATH_ID: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


class HttpFailure(Exception):
    """Raised by a handler; the middleware turns it into a JSON error response."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps({"reason": self.reason, "message": self.message}),
            content_type="application/json",
            headers=self.headers,
        )


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def path_id(request: web.Request, name: str, what: str) -> str:
    value = request.match_info.get(name, "")
    if not PATH_ID.fullmatch(value) or set(value) <= {"."}:
        raise HttpFailure(
            400,
            codec.Reject.BAD_ID.value,
            f"{what} {value[:80]!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ - "
            "(not only dots)",
        )
    return value


def version_json(model_id: str, update: ModelUpdate) -> dict[str, object]:
    return {
        "version": update.version,
        "parent_version": update.parent_version,
        "trigger_id": update.trigger_id,
        "is_best": update.is_best,
        "sha256": update.sha256,
        "size": update.size,
        "encoding": update.encoding,
        "created_at_ms": update.created_at_ms,
        "checkpoint_url": f"/v1/models/{model_id}/checkpoints/{update.version}",
        "metrics": asdict(update.metrics),
    }


def summary_json(entry: ModelEntry) -> dict[str, object]:
    return {
        "id": entry.model_id,
        "backbone": entry.backbone.value,
        "cut": entry.cut.value,
        "num_classes": entry.num_classes,
        "latest": entry.latest.version if entry.latest else None,
        "best": entry.best.version if entry.best else None,
        "versions": len(entry.history),
    }


def check_push(
    data: bytes,
    model_id: str,
    entry: ModelEntry,
    *,
    max_samples: int,
    max_bytes: int | None = None,
) -> FeaturePush:
    """Decode a push posted to ``model_id`` and check it fits the model with the rule the
    agents apply to the feature log (:func:`pipeline.samples.admit_push`), so a push is
    refused for the same reason on both paths: 413 ``too_large`` over ``max_bytes``, 400
    with the rule's reason otherwise."""
    fit = ModelFit.of_entry(entry, max_push_samples=max_samples, max_push_bytes=max_bytes)
    push = admit_push(
        data,
        key_model=model_id,
        lookup=lambda m: fit if m == model_id else None,
        max_push_bytes=max_bytes,
        max_push_samples=max_samples,
    )
    if isinstance(push, Refusal):
        status = 413 if push.reason == PushReason.TOO_LARGE else 400
        raise HttpFailure(status, push.reason, push.message)
    return push
