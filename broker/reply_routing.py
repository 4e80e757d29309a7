"""Where an answer goes: always the requester's own inbox, never where it asks.

A request's ``reply_to`` only says which kind of inbox its sender has (a client's, a
worker's, or the coordinator's); the inbox topic's last level, which the broker
authenticated, says who the sender is. So nobody can aim our replies at a third party
(docs/security.md). Apart from the bus so that the rule is one pure function, tested
cell by cell.
"""

from __future__ import annotations

import logging

from schemas.topics import Topics

log = logging.getLogger("broker.bus")


def answer_inbox(topics: Topics, sender: str | None, reply_to: str | None,
                 what: str | None, *, own_principal: str | None, own_inbox: str | None,
                 coordinator: str | None) -> str | None:
    """The base inbox an answer goes to, or None: no answer.

    The coordinator's inbox is used only for a request from the coordinator
    (``coordinator``; any, when the bus was told none, except on the coordinator's own
    bus, which answers there only itself).
    """
    if not reply_to:
        return None
    if not sender:
        log.warning("not answering %s: its topic names no authenticated sender", what)
        return None
    rest = topics.split(reply_to)
    if rest == ["coord", "inbox"]:
        if sender == own_principal or (
                own_inbox != topics.coord_inbox and coordinator in (None, sender)):
            return reply_to
        log.warning("not answering %s from %s: its reply_to is the coordinator's inbox",
                    what, sender)
        return None
    if rest is not None and len(rest) == 3 and rest[0] in ("client", "worker") and (
            rest[2] == "inbox"):
        try:
            own = (topics.client_inbox(sender) if rest[0] == "client"
                   else topics.worker_inbox(sender))
        except ValueError:
            return None
        if own != reply_to:
            log.warning("%s from %s asked for its answer in %s; answering in its own "
                        "inbox %s", what, sender, reply_to[:200], own)
        return own
    log.warning("not answering %s from %s: reply_to %r is not an inbox", what, sender,
                reply_to[:200])
    return None
