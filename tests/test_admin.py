"""Administration over the bus (coordinator/admin.py, client/admin.py), the direct-database
path kept for bootstrap (coordinator/bootstrap.py), and the client's import hygiene.

The grid tests run on both brokers. Mosquitto learns about principals only from its
exported files, so after a change the tests re-export and reload it
(``grid.broker.principals_changed()``), as an operator would; the embedded broker reads
the store itself.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Bus, BusError, Incoming
from broker.config import BusConfig
from client.admin import Admin, principals_table
from client.errors import ClientError
from client.reservation import Refused
from coordinator import bootstrap
from coordinator.admin import AdminHandlers
from coordinator.handling import Refusal
from coordinator.store import Store
from schemas.codec import encode, envelope
from schemas.messages import (
    BrokerRecheck,
    MosquittoExport,
    PrincipalsAdd,
    PrincipalsList,
    PrincipalsListReply,
    PrincipalsRevoke,
    PrincipalsRotate,
)
from schemas.registry import resolved_schema
from schemas.topics import Topics
from tests.fixtures.backends import BrokerHandle
from tests.fixtures.grid import ADMIN, COORDINATOR, GridHarness
from tests.fixtures.services import wait_for

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration]


def connects(grid: GridHarness, principal: str, token: str) -> bool:
    """True when the broker accepts ``principal`` with ``token`` now."""
    bus = Bus(BusConfig(url=grid.url, principal=principal, token=token, root=grid.root,
                        reconnect_max_s=1.0))
    try:
        bus.start(timeout=5)
    except BusError as err:
        assert f"refused principal {principal}" in str(err), err  # noqa: PT017 (a probe)
        return False
    bus.stop()
    return True


def admin_of(grid: GridHarness) -> Admin:
    grid.start_coordinator()
    return Admin(grid.client(ADMIN, "admin"))


# ----------------------------------------------------------------------- over the bus


def test_principal_lifecycle_over_the_bus(grid: GridHarness, grid_broker: BrokerHandle) -> None:
    admin = admin_of(grid)
    token = admin.add_principal("alice", "client", "a user")
    assert len(token) >= 40
    grid_broker.principals_changed()
    assert connects(grid, "alice", token)

    rows = {p.id: p for p in admin.principals()}
    assert rows["alice"].role == "client"
    assert rows["alice"].note == "a user"
    assert rows["alice"].revoked_at is None
    assert {ADMIN, COORDINATOR} <= set(rows)
    listed = principals_table(list(rows.values()))
    assert "alice" in listed, "tokens are never listed"
    assert token not in listed, "tokens are never listed"

    with pytest.raises(Refused) as refused:
        admin.add_principal("alice")
    assert refused.value.code == "conflict"
    assert "already exists" in str(refused.value)

    rotated = admin.rotate("alice")
    assert rotated != token
    grid_broker.principals_changed()
    assert connects(grid, "alice", rotated)
    assert not connects(grid, "alice", token), "the old token died with the rotation"

    replaced = admin.add_principal("alice", "client", replace=True)
    grid_broker.principals_changed()
    assert connects(grid, "alice", replaced)
    assert not connects(grid, "alice", rotated)

    admin.revoke("alice")
    grid_broker.principals_changed()
    assert not connects(grid, "alice", replaced)
    assert "alice" not in {p.id for p in admin.principals()}
    everyone = {p.id: p for p in admin.principals(include_revoked=True)}
    assert everyone["alice"].revoked_at is not None
    with pytest.raises(Refused) as refused:
        admin.revoke("alice")
    assert refused.value.code == "not_found"
    with pytest.raises(Refused) as refused:
        admin.rotate("nobody")
    assert refused.value.code == "not_found"

    again = admin.add_principal("alice", "worker")  # a revoked id may be reissued
    assert again not in (token, rotated, replaced)
    assert {p.id: p.role for p in admin.principals()}["alice"] == "worker"


def raw_requests(grid: GridHarness, docs: list[dict[str, Any]]) -> list[Any]:
    """Publish hand-made JSON (what a hostile admin could send) as the admin; the replies."""
    inbox = grid.topics.client_inbox(ADMIN)
    bus = grid.bus(ADMIN, "admin", inbox=inbox, start=False)
    replies: dict[str | None, Any] = {}
    for mtype in ("error", "principals.token", "ok"):
        bus.on_inbox(mtype, lambda incoming: replies.__setitem__(incoming.message.re,
                                                                 incoming.body))
    bus.start(timeout=5)
    for i, doc in enumerate(docs):
        doc = {"v": 1, "id": f"raw-{i}", "ts": 1.0, "reply_to": inbox, **doc}
        bus.publish_bytes(grid.topics.inbox_for(grid.topics.coord_inbox, ADMIN),
                          json.dumps(doc).encode())
    wait_for(lambda: len(replies) == len(docs), 10, message=f"replies: {replies}")
    return [replies[f"raw-{i}"] for i in range(len(docs))]


def test_bad_admin_requests_are_refused_and_change_nothing(grid: GridHarness) -> None:
    admin = admin_of(grid)
    before = bootstrap.list_principals(grid.store, include_revoked=True)
    # The client says what is wrong before sending ...
    for bad in ("a/b", "a+b", "#", "x" * 129, ""):
        with pytest.raises(ClientError, match="invalid principal id"):
            admin.add_principal(bad)
    with pytest.raises(ClientError, match="unknown role"):
        admin.add_principal("carol", "root")
    with pytest.raises(ClientError, match="at most 1024"):
        admin.add_principal("carol", note="n" * 1025)
    # ... and the coordinator refuses the same when a client does not.
    add = {"type": "principals.add", "role": "client"}
    replies = raw_requests(grid, [
        {**add, "principal": "a/b"}, {**add, "principal": "x" * 129},
        {**add, "principal": "carol", "role": "root"},
        {**add, "principal": "carol", "note": "n" * 1025},
        {**add, "principal": "carol", "token": "chosen-by-me"},
        {"type": "principals.list", "limit": 100000},
        {"type": "principals.revoke", "principal": ["admin"]},
    ])
    assert [(r.TYPE, r.code) for r in replies] == [("error", "invalid")] * len(replies)
    # The coordinator will not cut itself off.
    for request in (PrincipalsRevoke(principal=COORDINATOR),
                    PrincipalsRotate(principal=COORDINATOR),
                    PrincipalsAdd(principal=COORDINATOR, role="coordinator", replace=True)):
        with pytest.raises(Refused) as refused:
            admin.grid.call(request)
        assert refused.value.code == "conflict", request
    assert bootstrap.list_principals(grid.store, include_revoked=True) == before


def test_only_admins_are_served(grid: GridHarness) -> None:
    grid.start_coordinator()
    grid.token("bob", "client")
    grid.token("w1", "worker")
    before = bootstrap.list_principals(grid.store, include_revoked=True)
    for principal, role in (("bob", "client"), ("w1", "worker")):
        bus = grid.bus(principal, role, inbox=grid.topics.client_inbox(principal)
                       if role == "client" else grid.topics.worker_inbox(principal))
        for request in (PrincipalsAdd(principal="mallory", role="admin"),
                        PrincipalsRotate(principal=ADMIN), PrincipalsRevoke(principal=ADMIN),
                        PrincipalsList(), MosquittoExport()):
            reply = bus.request(grid.topics.coord_inbox, request, raise_errors=False).body
            assert (reply.TYPE, reply.code) == ("error", "forbidden"), (principal, request)
    assert bootstrap.list_principals(grid.store, include_revoked=True) == before


def test_drain_over_the_admin_api(grid: GridHarness) -> None:
    admin = admin_of(grid)
    grid.start_worker("w1")
    assert admin.drain("w1") == "draining"
    grid.wait_worker("w1", "draining")
    assert admin.drain("w1", drain=False) == "online"
    grid.wait_worker("w1", "online")


def test_principal_list_pages_follow_each_other(grid: GridHarness) -> None:
    admin = admin_of(grid)
    ids = [f"user-{i:02d}" for i in range(23)]
    for pid in ids:
        bootstrap.issue_token(grid.store, pid, "client")
    expected = sorted([*ids, ADMIN, COORDINATOR])
    assert [p.id for p in admin.principals(page_size=5)] == expected
    first: PrincipalsListReply = admin.grid.call(PrincipalsList(limit=5))
    assert len(first.principals) == 5
    assert first.cursor == first.principals[-1]["id"]
    last: PrincipalsListReply = admin.grid.call(PrincipalsList(after=expected[-3], limit=5))
    assert [r["id"] for r in last.principals] == expected[-2:]
    assert last.cursor is None


def test_mosquitto_export_over_the_bus(grid: GridHarness, tmp_path: Path) -> None:
    admin = admin_of(grid)
    admin.add_principal("alice")
    passwd, acl = admin.export_mosquitto(tmp_path / "export")
    for path in (passwd, acl):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    direct = bootstrap.mosquitto_files(grid.store, grid.root)
    assert passwd.read_text() == direct.passwd
    assert acl.read_text() == direct.acl
    assert "alice:$7$" in passwd.read_text()
    assert "user alice\n" in acl.read_text()


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_revoke_and_rotate_cut_live_sessions(grid: GridHarness) -> None:
    """Needs the embedded broker to act on broker.recheck (helper A2's part)."""
    admin = admin_of(grid)
    for action in ("revoke", "rotate"):
        pid = f"victim-{action}"
        token = admin.add_principal(pid)
        victim = grid.bus(pid, "client", inbox=grid.topics.client_inbox(pid))
        assert victim.connected.is_set()
        getattr(admin, action)(pid)

        def cut(v: Bus = victim) -> bool:
            return not v.connected.is_set()

        wait_for(cut, 10, message=f"{pid}'s live session survived the {action}")
        assert not connects(grid, pid, token)


@pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
def test_revoke_and_rotate_publish_broker_recheck(grid: GridHarness) -> None:
    """The coordinator's half of cutting sessions: one broker.recheck per revoke or
    rotation on {root}/broker/recheck (Mosquitto forwards it like any message)."""
    admin = admin_of(grid)
    seen: list[tuple[str | None, list[str]]] = []
    arrived = threading.Event()

    def record(incoming: Incoming) -> None:
        seen.append((incoming.topic, list(incoming.body.principals)))
        arrived.set()

    listener = grid.bus("recheck-listener", "coordinator", start=False)
    listener.subscribe(grid.topics.broker_recheck, record, types=(BrokerRecheck.TYPE,))
    listener.start(timeout=5)
    admin.add_principal("alice")
    admin.add_principal("bob")
    admin.rotate("alice")
    wait_for(lambda: len(seen) >= 1, 10, message="broker.recheck after the rotation")
    admin.revoke("bob")
    wait_for(lambda: len(seen) >= 2, 10, message="broker.recheck after the revoke")
    topic = grid.topics.broker_recheck
    assert seen == [(topic, ["alice"]), (topic, ["bob"])]


def test_the_admin_cli_goes_over_the_bus(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    home = tmp_path / "home"
    admin_token = grid.token(ADMIN, "admin")
    bob_token = grid.token("bob", "client")

    def xcloud(*args: str, principal: str = ADMIN, token: str = admin_token
               ) -> subprocess.CompletedProcess[str]:
        env = grid.subprocess_env(XCLOUD_HOME=str(home), XCLOUD_BUS_URL=grid.url,
                                  XCLOUD_BUS_ROOT=grid.root, XCLOUD_BUS_PRINCIPAL=principal,
                                  XCLOUD_BUS_TOKEN=token, XCLOUD_LOG_LEVEL="WARNING")
        return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def clean_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, result.stderr
        assert needle in errors[0], result.stderr

    added = xcloud("admin", "principal", "add", "alice", "--note", "a user")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert "alice (client) created" in added.stdout
    assert len(token) >= 40
    assert bootstrap.live_principal(grid.store, "alice").note == "a user"

    listed = xcloud("admin", "principal", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["alice"][1] == "client"
    assert token not in listed.stdout

    rotated = xcloud("admin", "principal", "rotate", "alice")
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip().splitlines()[-1]
    assert new_token != token
    assert len(new_token) >= 40

    revoked = xcloud("admin", "principal", "revoke", "alice")
    assert revoked.returncode == 0
    assert "alice revoked" in revoked.stdout
    assert "alice" not in xcloud("admin", "principal", "list").stdout
    assert "alice" in xcloud("admin", "principal", "list", "--all").stdout
    clean_error(xcloud("admin", "principal", "revoke", "alice"), "alice")
    clean_error(xcloud("admin", "principal", "add", "a/b"), "invalid principal id")

    exported = xcloud("admin", "mosquitto-export", str(tmp_path / "mosquitto"))
    assert exported.returncode == 0, exported.stderr
    assert "password_file" in exported.stdout, exported.stderr
    assert (tmp_path / "mosquitto" / "passwd").read_text() == \
        bootstrap.mosquitto_files(grid.store, grid.root).passwd

    grid.start_worker("w1")
    drained = xcloud("admin", "drain", "w1")
    assert drained.returncode == 0, drained.stderr
    assert "draining" in drained.stdout, drained.stderr
    grid.wait_worker("w1", "draining")
    assert xcloud("admin", "drain", "w1", "--undo").returncode == 0
    grid.wait_worker("w1", "online")

    clean_error(xcloud("admin", "principal", "list", principal="bob", token=bob_token),
                "not an admin")
    clean_error(xcloud("admin", "principal", "add", "mallory", "--role", "admin",
                       principal="bob", token=bob_token), "not an admin")
    assert grid.store.get_principal("mallory") is None
    assert not (home / "data").exists(), "the CLI never opened a database of its own"


def test_admin_without_credentials_points_at_db(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCLOUD_")}
    env.update(XCLOUD_HOME=str(tmp_path / "empty"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "client.cli", "admin", "principal", "list"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "no client credentials" in result.stderr
    assert "--db" in result.stderr


# ----------------------------------------------------------------------- bounds


def _handlers(store: Store, max_payload: int) -> AdminHandlers:
    bus = Bus(BusConfig(principal=COORDINATOR))  # never started: these handlers only read
    return AdminHandlers(bus, store, Topics("grid"), own_principal=COORDINATOR,
                         max_payload=max_payload)


def _incoming(body: Any) -> Incoming:
    return Incoming("grid/coord/inbox/admin", envelope(body, reply_to="grid/client/admin/inbox"),
                    ADMIN)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(f"sqlite:///{tmp_path / 'admin.db'}")
    yield s
    s.close()


def test_every_list_page_fits_the_bus(store: Store) -> None:
    max_payload = 8 * 1024
    ids = [f"p{i:03d}-\u00e9\u00e8" for i in range(40)]  # non-ASCII: escaped on the wire
    for pid in ids:
        bootstrap.issue_token(store, pid, "client", "\u2603" * 1024)
    handlers = _handlers(store, max_payload)
    got: list[str] = []
    after = None
    pages = 0
    while True:
        reply = handlers.principals_list(_incoming(PrincipalsList(after=after, limit=500)))
        size = len(encode(envelope(reply, re="x" * 64)))
        assert size <= max_payload, size
        got += [r["id"] for r in reply.principals]
        pages += 1
        if reply.cursor is None:
            break
        after = reply.cursor
    assert got == sorted(ids)
    assert pages > 2


def test_a_mosquitto_export_that_does_not_fit_is_refused(store: Store) -> None:
    for i in range(40):
        bootstrap.issue_token(store, f"worker-{i:02d}", "worker")
    with pytest.raises(Refusal) as refused:
        _handlers(store, 8 * 1024).mosquitto_export(_incoming(MosquittoExport()))
    assert refused.value.code == "too_large"
    assert "--db" in str(refused.value)
    reply = _handlers(store, 4 * 1024 * 1024).mosquitto_export(_incoming(MosquittoExport()))
    assert reply.principals == 40


def test_admin_schemas_bound_every_field() -> None:
    """No open objects, no unbounded strings or lists in the admin messages."""

    def check(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        if "string" in kinds and "enum" not in node and "const" not in node:
            assert "maxLength" in node, where
        if "array" in kinds:
            assert "maxItems" in node, where
        if "object" in kinds and where != "":
            assert node.get("additionalProperties") is False, where
        for key, value in node.get("properties", {}).items():
            if value is not True:
                check(value, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            check(node["items"], f"{where}[]")

    for name in ("principals.add", "principals.rotate", "principals.revoke",
                 "principals.token", "principals.list", "principals.list.reply",
                 "mosquitto.export", "mosquitto.export.reply"):
        schema = resolved_schema(name)
        for key, value in schema["properties"].items():
            if key not in ("type", "v", "id", "ts", "reply_to", "re"):
                check(value, f"{name}.{key}")
    raw = json.loads((REPO / "schemas/json/principals.add.json").read_text())
    assert raw["properties"]["principal"] == {"$ref": "envelope.json#/definitions/principal_id"}
    note = resolved_schema("principals.add")["properties"]["note"]
    assert note["maxLength"] == bootstrap.NOTE_MAX


# ----------------------------------------------------------------------- imports


def test_client_modules_do_not_import_the_coordinator_store() -> None:
    """Every client module, imported in a fresh interpreter, leaves the coordinator's
    store and models (and peewee) unloaded."""
    code = (
        "import importlib, pkgutil, sys, client\n"
        "for m in pkgutil.iter_modules(client.__path__):\n"
        "    importlib.import_module('client.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('peewee', 'playhouse')\n"
        "             or n.startswith(('coordinator.store', 'coordinator.models')))\n"
        "print(len(list(pkgutil.iter_modules(client.__path__))), bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 8, out
    assert out[1].strip() == "[]", out


def test_client_api_and_reservation_do_not_import_each_other() -> None:
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((REPO / f"{module.replace('.', '/')}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    assert "client.reservation" in imports("client.api")
    assert "client.api" not in imports("client.reservation")
