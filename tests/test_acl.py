"""The topic ACL: sender-suffix inbox rule, role rights, wildcard escalation."""

from __future__ import annotations

import pytest

from broker.acl import (
    Acl,
    Principal,
    Role,
    filter_covers,
    topic_matches,
    valid_topic_filter,
)

ACL = Acl("xcloud")
COORD = Principal("coord", Role.COORDINATOR)
W1 = Principal("w1", Role.WORKER)
W2 = Principal("w2", Role.WORKER)
ALICE = Principal("alice", Role.CLIENT)
BOB = Principal("bob", Role.CLIENT)
ROOT = Principal("root", Role.ADMIN)


# -- matching primitives -------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # empty level is a level
        ("a/#", "a", True),  # '#' includes the parent
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),  # '#' matches a and a/b/c
        ("a/+", "a/b/c", False),
        ("a/b", "a/+", False),
        ("a/#", "a/#", True),
        ("a/#", "a", True),
        ("a/#", "a/+/c/#", True),
        ("a/#", "#", False),
        ("a/+/c", "a/+/c", True),
        ("a/+/c", "a/+/+", False),
        ("+/+", "a/+", True),
        ("#", "#", True),
        ("#", "$SYS/#", False),
        ("$SYS/#", "$SYS/broker/x", True),
        ("a/b/#", "a/#", False),
        ("a/+/#", "a/#", False),  # a/# matches "a", which a/+/# does not
    ],
)
def test_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


@pytest.mark.parametrize("flt", ["a/#/b", "a/b#", "a/+b", "", "a\0b", "##"])
def test_invalid_filters(flt: str) -> None:
    assert not valid_topic_filter(flt)


# -- principals ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "", "x\0", "z" * 129])
def test_principal_ids_with_topic_syntax_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid principal id"):
        Principal(bad, Role.CLIENT)


def test_principal_role_from_string() -> None:
    p = Principal("alice", "client")  # type: ignore[arg-type]
    assert p.role is Role.CLIENT
    with pytest.raises(ValueError, match="not a valid Role"):
        Principal("alice", "superuser")  # type: ignore[arg-type]


def test_acl_refuses_bad_root() -> None:
    for bad in ["", "a/+", "a/#", "$SYS", "a//b"]:
        with pytest.raises(ValueError, match="invalid topic root"):
            Acl(bad)


def test_forged_principal_gets_nothing() -> None:
    forged = Principal("ok", Role.CLIENT)
    object.__setattr__(forged, "id", "+")  # bypass validation on purpose
    assert ACL.rules(forged) == ([], [])
    assert not ACL.can_publish(forged, "xcloud/coord/inbox/+")


# -- coordinator -----------------------------------------------------------------------


def test_coordinator_owns_the_root() -> None:
    assert ACL.can_publish(COORD, "xcloud/client/alice/inbox/coord")
    assert ACL.can_publish(COORD, "xcloud/worker/w1/inbox/coord")
    assert ACL.can_publish(COORD, "xcloud/coord/status")
    assert ACL.can_subscribe(COORD, "xcloud/#")
    assert ACL.can_subscribe(COORD, "xcloud/coord/inbox/+")
    assert not ACL.can_publish(COORD, "other/thing")
    assert not ACL.can_subscribe(COORD, "#")


# -- workers ---------------------------------------------------------------------------


def test_worker_publishes_own_state_only() -> None:
    for leaf in ("status", "caps", "heartbeat"):
        assert ACL.can_publish(W1, f"xcloud/worker/w1/{leaf}")
        assert not ACL.can_publish(W1, f"xcloud/worker/w2/{leaf}")  # another worker's status
    assert not ACL.can_publish(W1, "xcloud/coord/status")
    assert not ACL.can_publish(W1, "xcloud/event/worker/joined")


def test_worker_inbox_slots() -> None:
    assert ACL.can_publish(W1, "xcloud/coord/inbox/w1")
    assert ACL.can_publish(W1, "xcloud/client/alice/inbox/w1")
    assert not ACL.can_publish(W1, "xcloud/coord/inbox/w2")  # another sender's slot
    assert not ACL.can_publish(W1, "xcloud/coord/inbox/coord")
    assert not ACL.can_publish(W1, "xcloud/client/alice/inbox/coord")
    assert not ACL.can_publish(W1, "xcloud/worker/w2/inbox/w1")  # worker to worker omitted
    assert not ACL.can_publish(W1, "xcloud/coord/inbox")  # base topic without sender
    assert not ACL.can_publish(W1, "xcloud/coord/inbox/w1/extra")


def test_worker_subscriptions() -> None:
    assert ACL.can_subscribe(W1, "xcloud/worker/w1/inbox/+")
    assert ACL.can_subscribe(W1, "xcloud/worker/w1/inbox/coord")
    assert ACL.can_subscribe(W1, "xcloud/coord/status")
    assert ACL.can_subscribe(W1, "xcloud/coord/pubkey")
    assert not ACL.can_subscribe(W1, "xcloud/worker/w2/inbox/+")
    assert not ACL.can_subscribe(W1, "xcloud/worker/+/inbox/+")
    assert not ACL.can_subscribe(W1, "xcloud/worker/w1/inbox/#")
    assert not ACL.can_subscribe(W1, "xcloud/coord/inbox/+")
    assert not ACL.can_subscribe(W1, "xcloud/worker/+/status")
    assert not ACL.can_subscribe(W1, "xcloud/#")
    assert ACL.can_receive(W1, "xcloud/worker/w1/inbox/alice")
    assert not ACL.can_receive(W1, "xcloud/worker/w2/inbox/alice")


# -- clients and admins ----------------------------------------------------------------


def test_client_inbox_slots() -> None:
    assert ACL.can_publish(ALICE, "xcloud/coord/inbox/alice")
    assert ACL.can_publish(ALICE, "xcloud/worker/w1/inbox/alice")
    assert not ACL.can_publish(ALICE, "xcloud/coord/inbox/bob")  # impersonating bob
    # impersonating the coordinator
    assert not ACL.can_publish(ALICE, "xcloud/worker/w1/inbox/coord")
    assert not ACL.can_publish(ALICE, "xcloud/client/bob/inbox/alice")  # client to client
    assert not ACL.can_publish(ALICE, "xcloud/client/alice/inbox/alice")
    assert not ACL.can_publish(ALICE, "xcloud/worker/w1/status")
    assert not ACL.can_publish(ALICE, "xcloud/coord/status")
    assert not ACL.can_publish(ALICE, "xcloud/event/x")


def test_wildcards_in_publish_are_denied() -> None:
    for who in (COORD, W1, ALICE):
        assert not ACL.can_publish(who, "xcloud/coord/inbox/+")
        assert not ACL.can_publish(who, "xcloud/#")
        assert not ACL.can_publish(who, "xcloud/worker/+/inbox/alice")


def test_client_subscriptions() -> None:
    ok = [
        "xcloud/client/alice/inbox/+",
        "xcloud/client/alice/inbox/w1",
        "xcloud/worker/+/status",
        "xcloud/worker/w1/status",
        "xcloud/worker/+/caps",
        "xcloud/coord/status",
        "xcloud/coord/pubkey",
        "xcloud/event/#",
        "xcloud/event/job/+",
    ]
    for flt in ok:
        assert ACL.can_subscribe(ALICE, flt), flt


@pytest.mark.parametrize(
    "flt",
    [
        "#",
        "xcloud/#",
        "xcloud/+",
        "xcloud/+/status",
        "xcloud/client/+/inbox/+",
        "xcloud/client/bob/inbox/+",
        "xcloud/client/alice/inbox/#",
        "xcloud/client/alice/#",
        "xcloud/worker/+/+",
        "xcloud/worker/#",
        "xcloud/worker/+/inbox/+",
        "xcloud/worker/w1/inbox/alice",
        "xcloud/worker/+/heartbeat",
        "xcloud/coord/inbox/+",
        "xcloud/coord/#",
        "+/client/alice/inbox/+",
        "$SYS/#",
        "$SYS/broker/clients/connected",
        "xcloud/client/alice/inbox/+/#",
        "xcloud/client/alice/inbox/+/x",
    ],
)
def test_client_wildcard_escalation_is_refused(flt: str) -> None:
    assert not ACL.can_subscribe(ALICE, flt)


def test_admin_reads_heartbeats_clients_do_not() -> None:
    assert ACL.can_subscribe(ROOT, "xcloud/worker/+/heartbeat")
    assert not ACL.can_subscribe(ALICE, "xcloud/worker/+/heartbeat")
    assert ACL.can_publish(ROOT, "xcloud/coord/inbox/root")
    assert not ACL.can_publish(ROOT, "xcloud/coord/inbox/alice")
    assert not ACL.can_subscribe(ROOT, "xcloud/#")


def test_sys_never_for_non_coordinators() -> None:
    for who in (W1, ALICE, ROOT):
        assert not ACL.can_subscribe(who, "$SYS/#")
        assert not ACL.can_receive(who, "$SYS/broker/uptime")
        assert not ACL.can_publish(who, "$SYS/broker/uptime")


def test_rules_listing_and_roots() -> None:
    pub, sub = Acl("grid/a").rules(BOB)
    assert pub == ["grid/a/coord/inbox/bob", "grid/a/worker/+/inbox/bob",
                   "grid/a/coord/xfer/bob/#", "grid/a/worker/+/xfer/bob/#"]
    assert "grid/a/client/bob/inbox/+" in sub
    assert "grid/a/client/bob/xfer/#" in sub
    other = Acl("other")
    assert not other.can_publish(BOB, "xcloud/coord/inbox/bob")
    assert other.can_publish(BOB, "other/coord/inbox/bob")


def test_rule_cache_is_bounded() -> None:
    acl = Acl()
    for i in range(5000):
        assert acl.can_publish(Principal(f"c{i}", Role.CLIENT), f"xcloud/coord/inbox/c{i}")
    assert len(acl._cache) <= 4096


def test_only_state_topics_are_retained() -> None:
    assert ACL.can_retain(W1, "xcloud/worker/w1/status")
    assert ACL.can_retain(W1, "xcloud/worker/w1/caps")
    assert not ACL.can_retain(W1, "xcloud/worker/w1/heartbeat")
    assert not ACL.can_retain(W1, "xcloud/worker/w2/status")  # not its own
    assert not ACL.can_retain(W1, "xcloud/coord/inbox/w1")
    assert not ACL.can_retain(ALICE, "xcloud/coord/inbox/alice")
    assert ACL.can_retain(COORD, "xcloud/coord/status")
    assert ACL.can_retain(COORD, "xcloud/coord/pubkey")
    assert ACL.can_retain(COORD, "xcloud/worker/w1/status")  # e.g. clearing a stale status
    assert not ACL.can_retain(COORD, "xcloud/event/worker/lost")
    assert not ACL.can_retain(COORD, "xcloud/client/alice/inbox/coord")


def test_only_coordinator_and_admin_may_ask_the_broker_to_recheck() -> None:
    topic = "xcloud/broker/recheck"
    for who in (COORD, ROOT):
        assert ACL.can_publish(who, topic)
        assert ACL.can_subscribe(who, topic)
        assert not ACL.can_retain(who, topic)
    for who in (ALICE, W1):
        assert not ACL.can_publish(who, topic)
        assert not ACL.can_subscribe(who, topic)
        assert not ACL.can_receive(who, topic)
    assert not ACL.can_subscribe(ROOT, "xcloud/broker/#")  # only that one topic
    assert not ACL.can_publish(ROOT, "xcloud/broker/other")
    assert Acl("grid/a").can_publish(ROOT, "grid/a/broker/recheck")
    assert not Acl("grid/a").can_publish(ROOT, "xcloud/broker/recheck")


# -- file transfer segments (docs/transfer.md) ------------------------------------------

SEGMENT = "tid0001/262144/deadbeef"  # {tid}/{offset}/{crc32} below the sender level


def test_segments_are_published_under_the_senders_own_id() -> None:
    assert ACL.can_publish(ALICE, f"xcloud/coord/xfer/alice/{SEGMENT}")
    assert ACL.can_publish(ALICE, f"xcloud/worker/w1/xfer/alice/{SEGMENT}")  # put
    assert ACL.can_publish(W1, f"xcloud/coord/xfer/w1/{SEGMENT}")  # results, uploads
    assert ACL.can_publish(W1, f"xcloud/client/alice/xfer/w1/{SEGMENT}")  # get
    assert ACL.can_publish(COORD, f"xcloud/worker/w1/xfer/coord/{SEGMENT}")  # downloads
    assert ACL.can_publish(COORD, f"xcloud/client/alice/xfer/coord/{SEGMENT}")
    assert ACL.can_publish(ROOT, f"xcloud/coord/xfer/root/{SEGMENT}")
    for who, topic in [
        (ALICE, f"xcloud/coord/xfer/bob/{SEGMENT}"),  # under another principal's id
        (ALICE, f"xcloud/worker/w1/xfer/bob/{SEGMENT}"),
        (ALICE, f"xcloud/client/bob/xfer/alice/{SEGMENT}"),  # client to client
        (ALICE, f"xcloud/client/alice/xfer/alice/{SEGMENT}"),
        (W1, f"xcloud/coord/xfer/w2/{SEGMENT}"),
        (W1, f"xcloud/worker/w2/xfer/w1/{SEGMENT}"),  # worker to worker, like inboxes
        (W1, f"xcloud/client/alice/xfer/coord/{SEGMENT}"),
        (ROOT, f"xcloud/coord/xfer/alice/{SEGMENT}"),
    ]:
        assert not ACL.can_publish(who, topic), (who.id, topic)
    for who in (ALICE, W1, COORD):
        assert not ACL.can_retain(who, f"xcloud/coord/xfer/{who.id}/{SEGMENT}")


def test_each_principal_subscribes_to_its_own_transfer_topics_only() -> None:
    assert ACL.can_subscribe(ALICE, "xcloud/client/alice/xfer/#")
    assert ACL.can_subscribe(ALICE, "xcloud/client/alice/xfer/+/+/+/+")
    assert ACL.can_subscribe(W1, "xcloud/worker/w1/xfer/+/+/+/+")
    assert ACL.can_subscribe(COORD, "xcloud/coord/xfer/+/+/+/+")
    for who, flt in [
        (ALICE, "xcloud/client/bob/xfer/#"),
        (ALICE, "xcloud/client/+/xfer/#"),
        (ALICE, "xcloud/coord/xfer/#"),
        (ALICE, "xcloud/coord/xfer/alice/#"),  # not even its own uploads to the coordinator
        (ALICE, "xcloud/worker/+/xfer/alice/#"),
        (ALICE, "xcloud/client/alice/#"),
        (W1, "xcloud/worker/w2/xfer/#"),
        (W1, "xcloud/worker/+/xfer/+/+/+/+"),
        (W1, "xcloud/client/alice/xfer/#"),
        (ROOT, "xcloud/coord/xfer/#"),
    ]:
        assert not ACL.can_subscribe(who, flt), (who.id, flt)
    assert ACL.can_receive(ALICE, f"xcloud/client/alice/xfer/coord/{SEGMENT}")
    assert not ACL.can_receive(BOB, f"xcloud/client/alice/xfer/coord/{SEGMENT}")
    assert not ACL.can_receive(W1, f"xcloud/worker/w2/xfer/alice/{SEGMENT}")
