"""The one base exception of the project and the errors every actor can meet."""

from __future__ import annotations


class FedexError(Exception):
    """Base of every error FedEx Stream raises on purpose."""


class ConfigError(FedexError):
    """A setting or argument is invalid; the message says which and what to do."""


class KafkaUnavailableError(FedexError):
    """The Kafka broker could not be started or reached."""
