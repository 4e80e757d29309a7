"""The MQTT topic tree, in one place.

Every inbox topic ends in the *sender's* principal id: ``{root}/coord/inbox/{sender}``,
``{root}/worker/{wid}/inbox/{sender}``, ``{root}/client/{cid}/inbox/{sender}``. The broker's
ACL lets a principal publish to an inbox only under its own id, so a receiver learns who
sent a message from the topic, which the broker authenticated (invariant 4), never from
the payload. Requests name the *base* inbox (without the sender) in ``reply_to``; the
replier appends its own id.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROOT = "xcloud"


def _check_segment(value: str, what: str) -> str:
    if not value or any(ch in value for ch in "/+#\0") or len(value) > 128:
        raise ValueError(f"invalid {what} {value!r}: must be 1-128 chars without / + # or NUL")
    return value


def valid_principal_id(value: str) -> bool:
    """True when ``value`` can be used as a principal (= MQTT user = topic segment)."""
    try:
        _check_segment(value, "principal id")
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Topics:
    """Topic names for one grid, identified by its ``root`` prefix."""

    root: str = DEFAULT_ROOT

    # -- coordinator -------------------------------------------------------
    @property
    def coord_status(self) -> str:
        return f"{self.root}/coord/status"

    @property
    def coord_pubkey(self) -> str:
        return f"{self.root}/coord/pubkey"

    @property
    def coord_inbox(self) -> str:
        """Base inbox of the coordinator (publish to ``coord_inbox + '/' + sender``)."""
        return f"{self.root}/coord/inbox"

    @property
    def coord_inbox_filter(self) -> str:
        return f"{self.root}/coord/inbox/+"

    # -- broker --------------------------------------------------------------
    @property
    def broker_recheck(self) -> str:
        """Where the coordinator asks the embedded broker to re-check revoked principals."""
        return f"{self.root}/broker/recheck"

    # -- workers -----------------------------------------------------------
    def worker_status(self, wid: str) -> str:
        return f"{self.root}/worker/{_check_segment(wid, 'worker id')}/status"

    def worker_caps(self, wid: str) -> str:
        return f"{self.root}/worker/{_check_segment(wid, 'worker id')}/caps"

    def worker_heartbeat(self, wid: str) -> str:
        return f"{self.root}/worker/{_check_segment(wid, 'worker id')}/heartbeat"

    def worker_inbox(self, wid: str) -> str:
        return f"{self.root}/worker/{_check_segment(wid, 'worker id')}/inbox"

    def worker_inbox_filter(self, wid: str) -> str:
        return f"{self.worker_inbox(wid)}/+"

    @property
    def all_worker_status(self) -> str:
        return f"{self.root}/worker/+/status"

    @property
    def all_worker_caps(self) -> str:
        return f"{self.root}/worker/+/caps"

    @property
    def all_worker_heartbeat(self) -> str:
        return f"{self.root}/worker/+/heartbeat"

    # -- clients -----------------------------------------------------------
    def client_inbox(self, cid: str) -> str:
        return f"{self.root}/client/{_check_segment(cid, 'client id')}/inbox"

    def client_inbox_filter(self, cid: str) -> str:
        return f"{self.client_inbox(cid)}/+"

    # -- events ------------------------------------------------------------
    def event(self, *parts: str) -> str:
        return "/".join([self.root, "event", *parts])

    @property
    def all_events(self) -> str:
        return f"{self.root}/event/#"

    @property
    def admin_job_events(self) -> str:
        """Every job's ``job.event``, published once per event by the coordinator; only
        admins may read it (broker.acl), unlike ``event/#`` (docs/security.md)."""
        return f"{self.root}/events/jobs"

    # -- transfers (docs/transfer.md) ---------------------------------------
    # A component's transfer base sits beside its inbox: segments for it arrive on
    # ``{base}/{sender}/{tid}/{offset}/{crc32}``, and the ACL lets a principal publish
    # there only under its own id, like the inbox's sender suffix.
    @property
    def coord_xfer(self) -> str:
        return f"{self.root}/coord/xfer"

    def worker_xfer(self, wid: str) -> str:
        return f"{self.root}/worker/{_check_segment(wid, 'worker id')}/xfer"

    def client_xfer(self, cid: str) -> str:
        return f"{self.root}/client/{_check_segment(cid, 'client id')}/xfer"

    def xfer_for_inbox(self, base_inbox: str) -> str:
        """The transfer base of the component whose base inbox is ``base_inbox``."""
        if not self.is_inbox(base_inbox):
            raise ValueError(f"{base_inbox!r} is not a base inbox of this grid")
        return base_inbox[: -len("inbox")] + "xfer"

    @staticmethod
    def xfer_filter(xfer_base: str) -> str:
        """What the owner of ``xfer_base`` subscribes to: every segment, any sender."""
        return f"{xfer_base}/+/+/+/+"

    @staticmethod
    def xfer_segment(xfer_base: str, sender: str, tid: str, offset: int, crc32: int) -> str:
        """The topic of one segment (``crc32`` as 8 lowercase hex digits)."""
        return f"{xfer_base}/{_check_segment(sender, 'sender id')}/{tid}/{offset}/{crc32:08x}"

    # -- helpers -------------------------------------------------------------
    def inbox_for(self, base: str, sender: str) -> str:
        """The concrete topic a ``sender`` publishes to in the inbox ``base``."""
        return f"{base}/{_check_segment(sender, 'sender id')}"

    def is_inbox(self, base: str) -> bool:
        """True when ``base`` is a base inbox topic of this grid (a valid ``reply_to``)."""
        parts = base.split("/")
        rparts = self.root.split("/")
        if parts[: len(rparts)] != rparts:
            return False
        rest = parts[len(rparts) :]
        if rest == ["coord", "inbox"]:
            return True
        return (
            len(rest) == 3
            and rest[0] in ("worker", "client")
            and rest[2] == "inbox"
            and valid_principal_id(rest[1])
        )

    def split(self, topic: str) -> list[str] | None:
        """The topic's levels below the root, or None when it is not under this root."""
        rparts = self.root.split("/")
        parts = topic.split("/")
        if parts[: len(rparts)] != rparts:
            return None
        return parts[len(rparts) :]

    def sender_of(self, topic: str) -> str | None:
        """The authenticated sender of a message received on an inbox topic."""
        rest = self.split(topic)
        if not rest:
            return None
        if len(rest) == 3 and rest[:2] == ["coord", "inbox"]:
            return rest[2]
        if len(rest) == 4 and rest[0] in ("worker", "client") and rest[2] == "inbox":
            return rest[3]
        return None

    def publisher_of(self, topic: str) -> str | None:
        """Who published a message on ``topic``, as far as the ACL tells: the sender of an
        inbox topic, the worker of its own presence topics (status, caps, heartbeat, which
        only it may publish besides the coordinator), else None."""
        sender = self.sender_of(topic)
        if sender is not None:
            return sender
        rest = self.split(topic)
        if rest and len(rest) == 3 and rest[0] == "worker" and rest[2] in (
                "status", "caps", "heartbeat"):
            return rest[1]
        return None

    def worker_of(self, topic: str) -> str | None:
        """The worker id of a ``{root}/worker/{wid}/...`` topic."""
        rest = self.split(topic)
        if rest and len(rest) >= 3 and rest[0] == "worker":
            return rest[1]
        return None
