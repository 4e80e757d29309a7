"""The one exception root of xcloud; every package family derives its own root from it."""

from __future__ import annotations


class XcloudError(Exception):
    """Root of every error xcloud raises on purpose.

    Entry points catch this and print ``str(err)`` to the user instead of a traceback.
    ``code`` is the wire error code (docs/protocol.md) a request handler answers with when
    this error ends a request; subclasses set their own, so handlers map errors to codes
    without an isinstance ladder.
    """

    code: str = "internal"


class WireError(XcloudError):
    """A message that is not valid on the wire (bad JSON, wrong schema, too large, ...).

    ``code`` is a stable machine-readable reason; ``message_id``/``reply_to`` are set when
    the offending message was readable enough to carry them, so an error reply can be sent.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        topic: str | None = None,
        message_type: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.topic = topic
        self.message_type = message_type
        self.message_id = message_id
        self.reply_to = reply_to
