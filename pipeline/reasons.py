"""Every machine-readable reason a FedEx record or request is refused with, in one place.

One vocabulary for both ways into the feature log: an HTTP error body (``{"reason": ...}``)
and a dead letter's ``reason`` carry the same strings for the same fault, so a client
handles a refusal the same whichever path it used. ``docs/wire-format.md`` documents every
one of them (``tests/unit/pipeline/test_reasons.py`` holds the two to each other).

The sources, each an enum owned where the check lives:

* :class:`~pipeline.codec.Reject`: what the codec tells from a record's bytes alone, plus
  ``unknown_model`` / ``model_mismatch`` (the push-fits-model rule, ``pipeline.samples``)
  and ``trigger_conflict`` (the trainer);
* :class:`PushReason`: the rest of the push-fits-model rule (size, tombstones);
* :class:`HttpReason`: what only the model server can refuse (its feature log away, a slow
  or greedy client, a checkpoint request it cannot serve);
* :class:`~pipeline.auth.AuthReason`: a missing, bad or insufficient device token.
"""

from __future__ import annotations

import enum
from typing import Final

from pipeline.auth import AuthReason
from pipeline.codec import Reject


class PushReason(enum.StrEnum):
    """Why a push is refused, beyond what the codec reads from its bytes."""

    #: Over the deployment's push byte limit (``FEDEX_MAX_PUSH_BYTES``): HTTP 413, and
    #: dead-lettered by the agents without being decoded.
    TOO_LARGE = "too_large"
    #: A feature-log record without a value: there is no push to read.
    TOMBSTONE = "tombstone"


class HttpReason(enum.StrEnum):
    """Why the model server refuses a request, beyond a push's content and the token."""

    #: 503: the feature log (Kafka) did not take the push; retry later.
    UNAVAILABLE = "unavailable"
    #: 408: the request head or a push body did not arrive within the server's timeout.
    TIMEOUT = "timeout"
    #: 429: the client's address holds as many connections as one address may.
    TOO_MANY_CONNECTIONS = "too_many_connections"
    #: 404: the model has no such version.
    UNKNOWN_VERSION = "unknown_version"
    #: 404/503: a version's checkpoint blob is not in the store.
    CHECKPOINT_MISSING = "checkpoint_missing"
    #: 416: a ``Range`` header outside the checkpoint.
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    #: 500: a bug in the server; its log has the traceback.
    INTERNAL = "internal"


#: Every reason any FedEx component can refuse a record or a request with.
REASONS: Final[frozenset[str]] = frozenset(
    r.value for source in (Reject, PushReason, HttpReason, AuthReason) for r in source
)
