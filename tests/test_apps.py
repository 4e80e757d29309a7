"""Applications (docs/data.md, "Applications") and the shell's data verbs.

The pure parts first (``resolve`` picks a worker's binary, platform spellings, version
order), then end to end on both brokers (and both databases where the store decides):
add / list / show / rm with binaries for two platforms resolved per worker, rights,
an app's data kept from garbage collection, malformed requests, ``xcloud app add`` as a
user runs it, and ``data put/get/ls/show/rm/pin`` in the shell."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Incoming
from broker.transfer import file_sha256
from client.console import Console
from client.errors import InvalidRequest
from client.reservation import Refused
from client.shell import run_line
from client.shell_commands import Shell
from coordinator.errors import InvalidArgument
from coordinator.store.apps import (
    AppRecord,
    Binary,
    Unresolvable,
    can_run,
    normalize_platform,
    resolve,
    version_key,
)
from schemas.messages import Error
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.services import wait_for
from tests.fixtures.transfer import make_file

A, B, C = "a" * 64, "b" * 64, "c" * 64
ONE_BROKER = pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)


def caps(os_name: str, arch: str, executors: tuple[str, ...] = ("process",),
         images: tuple[str, ...] = ()) -> dict[str, Any]:
    doc: dict[str, Any] = {"executors": list(executors),
                           "host": {"os": os_name, "arch": arch}}
    if images:
        doc["docker"] = {"available": True, "images": list(images)}
    return doc


def app(kind: str = "binaries", **fields: Any) -> AppRecord:
    return AppRecord(id="x", owner="alice", name="sim", version="1", kind=kind, **fields)


# ------------------------------------------------------------------------ pure functions


def test_resolve_picks_the_binary_of_the_workers_platform() -> None:
    sim = app(binaries=(Binary("linux/amd64", A, 10), Binary("linux/arm64", B, 20),
                        Binary("linux/arm", C, 30)))
    assert resolve(sim, caps("linux", "x86_64")).sha256 == A  # platform.machine() spelling
    assert resolve(sim, caps("Linux", "aarch64")).sha256 == B
    armv7 = resolve(sim, caps("linux", "armv7l"))  # no linux/arm/v7: the one without variant
    assert (armv7.platform, armv7.sha256, armv7.size) == ("linux/arm", C, 30)
    with pytest.raises(Unresolvable, match=r"no binary for darwin/arm64 \(it has linux/amd64"):
        resolve(sim, caps("darwin", "arm64"))
    with pytest.raises(Unresolvable, match="does not say its OS"):
        resolve(sim, {"executors": ["process"]})
    assert not can_run(sim, caps("windows", "amd64"))


def test_resolve_images_archives_and_commands() -> None:
    image = app("image", image="blender:4.1")
    assert resolve(image, caps("linux", "x86_64", ("process", "docker"),
                               ("blender:4.1",))).image == "blender:4.1"
    with pytest.raises(Unresolvable, match="does not hold image"):
        resolve(image, caps("linux", "x86_64", ("docker",), ("blender:4.0",)))
    with pytest.raises(Unresolvable, match="no docker executor"):
        resolve(image, caps("linux", "x86_64"))
    bare = app("image", image="busybox")  # a bare name is its :latest tag
    assert can_run(bare, caps("linux", "x86_64", ("docker",), ("busybox:latest",)))
    archive = app("image_archive", sha256=A, size=5)
    assert resolve(archive, caps("linux", "x86_64", ("docker",))).sha256 == A
    assert not can_run(archive, caps("linux", "x86_64"))
    command = app("command", command="wc -l")
    assert resolve(command, caps("freebsd", "riscv64")).command == "wc -l"


def test_platforms_and_versions() -> None:
    assert normalize_platform("Linux/X86_64") == "linux/amd64"
    assert normalize_platform("linux/armv7l") == "linux/arm/v7"
    assert normalize_platform("linux/arm/v7") == "linux/arm/v7"
    for bad in ("linux", "linux/amd64/v1/x", "linux/../amd64", "/amd64", "lin ux/amd64"):
        with pytest.raises(InvalidArgument):
            normalize_platform(bad)
    ordered = ["1", "1.2.3", "1.9", "1.10", "2.0-rc1", "2.0", "10"]
    assert sorted(reversed(ordered), key=version_key) == ordered


# --------------------------------------------------------------------------- end to end


@BOTH_DBS
def test_add_list_show_rm_with_binaries_for_two_platforms(grid: GridHarness,
                                                           tmp_path: Path) -> None:
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    amd = make_file(tmp_path / "sim-amd64", 70_000, seed=1)
    arm = make_file(tmp_path / "sim-arm64", 80_000, seed=2)
    v1 = alice.apps.add("sim", binaries={"linux/x86_64": amd, "linux/arm64": arm})
    assert (v1.name, v1.version, v1.kind, v1.owner) == ("sim", "1", "binaries", "alice")
    assert v1.binaries == {"linux/amd64": {"sha256": file_sha256(amd), "size": 70_000},
                           "linux/arm64": {"sha256": file_sha256(arm), "size": 80_000}}
    # The binaries went through grid.data (under app:... names) and are kept by the app.
    names = sorted(r.name for r in alice.data.ls())
    assert names == ["app:sim:next:linux/arm64", "app:sim:next:linux/x86_64"]
    refs = grid.store.data_refs(file_sha256(amd))
    assert refs == [("app", v1.id, "alice")]
    # Versions: no --version gives one above the highest number; latest is the highest.
    v2 = alice.apps.add("sim", binaries={"linux/amd64": amd})  # same content: no upload
    assert v2.version == "2"
    v10 = alice.apps.add("sim", version="1.10", command="./sim --fast")
    assert alice.apps.show("sim").version == "2"
    shown = alice.apps.show("sim", version="1.10")
    assert (shown.kind, shown.command, shown.latest) == ("command", "./sim --fast", False)
    assert shown.versions == ("2", "1.10", "1")
    assert [(a.name, a.version) for a in alice.apps.ls()] == [
        ("sim", "1"), ("sim", "1.10"), ("sim", "2")]
    with pytest.raises(Refused) as info:
        alice.apps.add("sim", version="2", image="busybox")
    assert info.value.code == "conflict"
    # resolve on the stored record, per platform.
    record = grid.store.find_app("alice", "sim", "1")
    assert record is not None
    assert resolve(record, caps("linux", "x86_64")).sha256 == file_sha256(amd)
    assert resolve(record, caps("linux", "aarch64")).sha256 == file_sha256(arm)
    # rm: one version, then the rest.
    assert alice.apps.rm("sim", version=v10.version) == 1
    assert alice.apps.rm("sim", all=True) == 2
    assert alice.apps.ls() == []
    assert grid.store.data_refs(file_sha256(amd)) == []
    with pytest.raises(Refused) as info:
        alice.apps.show("sim")
    assert (info.value.code, str(info.value)) == ("not_found", "you have no app sim")


def test_a_real_workers_caps_resolve_to_its_binary(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    grid.start_worker("w1")
    record = grid.wait_worker("w1", "online")
    alice = grid.client("alice", "client")
    prog = make_file(tmp_path / "prog", 1000, seed=3)
    other = make_file(tmp_path / "prog-other", 1000, seed=4)
    host = record.caps["host"]
    mine = normalize_platform(f"{host['os']}/{host['arch']}")
    foreign = "windows/amd64" if not mine.startswith("windows") else "linux/riscv64"
    alice.apps.add("prog", binaries={mine: prog, foreign: other})
    stored = grid.store.find_app("alice", "prog")
    assert stored is not None
    assert resolve(stored, record.caps).sha256 == file_sha256(prog)


def test_rights_like_data(grid: GridHarness, tmp_path: Path) -> None:
    grid.add_principals(("alice", "client"), ("bob", "client"), ("carol", "client"))
    grid.start_coordinator()
    alice, bob, carol = (grid.client(p, "client") for p in ("alice", "bob", "carol"))
    prog = make_file(tmp_path / "prog", 5000, seed=5)
    alice.apps.add("secret", binaries={"linux/amd64": prog})
    alice.apps.add("team", command="run-team", share=["bob"])
    alice.apps.add("open", image="busybox", access="public")
    with pytest.raises(Refused) as info:
        bob.apps.show("secret", owner="alice")
    assert info.value.code == "forbidden"
    assert bob.apps.show("team", owner="alice").command == "run-team"
    with pytest.raises(Refused) as info:
        carol.apps.show("team", owner="alice")
    assert info.value.code == "forbidden"
    assert carol.apps.show("open", owner="alice").image == "busybox"
    assert [a.name for a in bob.apps.ls(owner="alice")] == ["open", "team"]
    assert [a.name for a in carol.apps.ls(owner="alice")] == ["open"]
    with pytest.raises(Refused) as info:
        bob.apps.rm("team", all=True, owner="alice")
    assert info.value.code == "forbidden"
    with pytest.raises(Refused) as info:
        bob.apps.ls(all=True)
    assert info.value.code == "forbidden"
    # Registering needs the rights to read the binary: alice's private data is not bob's.
    sha = file_sha256(prog)
    with pytest.raises(Refused) as info:
        bob.apps.add("stolen", binaries={"linux/amd64": sha})
    assert info.value.code == "forbidden"
    with pytest.raises(Refused) as info:
        bob.apps.add("ghost", image_archive="d" * 64)
    assert info.value.code == "not_found"
    assert bob.apps.ls() == []
    admin = grid.client()
    assert len(admin.apps.ls(all=True)) == 3
    assert admin.apps.show("secret", owner="alice").binaries["linux/amd64"]["sha256"] == sha
    assert admin.apps.rm("secret", version="latest", owner="alice") == 1


def test_an_apps_data_is_kept_from_garbage_collection(grid: GridHarness,
                                                      tmp_path: Path) -> None:
    coordinator = grid.start_coordinator()
    alice = grid.client("alice", "client")
    tar = make_file(tmp_path / "tool.tar", 120_000, seed=6)
    added = alice.apps.add("tool", image_archive=tar)
    assert (added.kind, added.sha256, added.size) == ("image_archive", file_sha256(tar),
                                                      120_000)
    assert added.sha256 is not None
    (name,) = [r.name for r in alice.data.ls()]
    assert name == "app:tool:next:image"
    alice.data.rm(name)  # the name goes; the app still keeps the bytes
    assert coordinator.data.collect_garbage().objects == []
    assert grid.store.data_object(added.sha256) is not None
    shown = alice.apps.show("tool")
    assert shown.sha256 == added.sha256
    alice.apps.rm("tool", all=True)
    assert coordinator.data.collect_garbage().objects == [added.sha256]
    assert grid.store.data_object(added.sha256) is None


@ONE_BROKER
def test_malformed_and_refused_app_requests_change_nothing(grid: GridHarness) -> None:
    grid.add_principals(("alice", "client"), ("w1", "worker"))
    grid.start_coordinator()
    inbox = grid.topics.client_inbox("alice")
    errors: dict[str, Error] = {}
    bus = grid.bus("alice", "client", inbox=inbox, start=False)

    def on_error(incoming: Incoming) -> None:
        if incoming.message.re is not None:
            errors[incoming.message.re] = incoming.body

    bus.on_inbox("error", on_error)
    bus.start(timeout=5)
    invalid: dict[str, dict[str, Any]] = {
        "no-kind": {"type": "apps.add", "name": "x"},
        "bad-kind": {"type": "apps.add", "name": "x", "kind": "script", "command": "ls"},
        "bad-name": {"type": "apps.add", "name": "../x", "kind": "command", "command": "ls"},
        "long-name": {"type": "apps.add", "name": "n" * 129, "kind": "command",
                      "command": "ls"},
        "bad-platform": {"type": "apps.add", "name": "x", "kind": "binaries",
                         "binaries": {"linux": A}},
        "many-platforms": {"type": "apps.add", "name": "x", "kind": "binaries",
                           "binaries": {f"linux/a{i}": A for i in range(17)}},
        "short-sha": {"type": "apps.add", "name": "x", "kind": "image_archive",
                      "sha256": "abc"},
        "upper-sha": {"type": "apps.add", "name": "x", "kind": "image_archive",
                      "sha256": "A" * 64},
        "kind-mismatch": {"type": "apps.add", "name": "x", "kind": "image", "command": "ls"},
        "two-kinds": {"type": "apps.add", "name": "x", "kind": "command", "command": "ls",
                      "image": "busybox"},
        "latest-version": {"type": "apps.add", "name": "x", "version": "latest",
                           "kind": "command", "command": "ls"},
        "long-command": {"type": "apps.add", "name": "x", "kind": "command",
                         "command": "c" * 4097},
        "extra-field": {"type": "apps.list", "sql": "drop table"},
        "limit-0": {"type": "apps.list", "limit": 0},
        "show-no-name": {"type": "apps.show"},
        "rm-neither": {"type": "apps.rm", "name": "x"},
        "rm-both": {"type": "apps.rm", "name": "x", "version": "1", "all": True},
        "shared-nobody": {"type": "apps.add", "name": "x", "kind": "command",
                          "command": "ls", "access": "shared"},
    }
    topic = grid.topics.inbox_for(grid.topics.coord_inbox, "alice")
    for mid, doc in invalid.items():
        payload = {"v": 1, "id": mid, "ts": time.time(), "reply_to": inbox, **doc}
        bus.publish_bytes(topic, json.dumps(payload).encode())
    wait_for(lambda: set(invalid) <= set(errors), 10,
             message=f"errors for {set(invalid) - set(errors)}")
    assert {mid: errors[mid].code for mid in invalid} == dict.fromkeys(invalid, "invalid")
    assert grid.store.list_apps(None) == ([], 0)
    # Workers may not register or list apps.
    worker = grid.bus("w1", "worker", inbox=grid.topics.worker_inbox("w1"))
    from schemas.app_messages import AppsList

    reply = worker.request(grid.topics.coord_inbox, AppsList(), raise_errors=False).body
    assert isinstance(reply, Error)
    assert reply.code == "forbidden"
    # The client checks before sending, in the user's words.
    alice = grid.client("alice", "client")
    with pytest.raises(InvalidRequest, match="exactly one of"):
        alice.apps.add("x", command="ls", image="busybox")
    with pytest.raises(InvalidRequest, match="is not a file"):
        alice.apps.add("x", binaries={"linux/amd64": "/nonexistent/prog"})
    with pytest.raises(InvalidRequest, match="give the version"):
        alice.apps.rm("x")


@ONE_BROKER
def test_the_cli_adds_lists_shows_and_removes(grid: GridHarness, tmp_path: Path) -> None:
    token = grid.token("alice", "client")
    grid.start_coordinator()
    amd = make_file(tmp_path / "prog", 3000, seed=7)
    arm = make_file(tmp_path / "prog-arm", 3000, seed=8)
    env = grid.subprocess_env(XCLOUD_HOME=str(tmp_path / "cli-home"), XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root, XCLOUD_BUS_PRINCIPAL="alice",
                              XCLOUD_BUS_TOKEN=token, XCLOUD_LOG_LEVEL="ERROR")

    def xcloud(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "client.cli", "app", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    add = xcloud("add", "prog", "--version", "0.1", "--binary", f"linux/amd64={amd}",
                 "--binary", f"linux/arm64={arm}", "--json")
    assert add.returncode == 0, add.stderr
    assert add.stderr == ""  # no progress bar in a pipe
    info = json.loads(add.stdout)
    assert (info["name"], info["version"], sorted(info["binaries"])) == (
        "prog", "0.1", ["linux/amd64", "linux/arm64"])
    assert info["binaries"]["linux/arm64"]["sha256"] == file_sha256(arm)
    listing = xcloud("ls")
    assert listing.returncode == 0, listing.stderr
    assert "prog  0.1" in listing.stdout
    assert "linux/amd64, linux/arm64" in listing.stdout
    shown = xcloud("show", "prog")
    assert "binary:" in shown.stdout
    assert file_sha256(amd) in shown.stdout
    bad = xcloud("add", "prog", "--binary", "linux/amd64")
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("xcloud: error: --binary takes OS/ARCH=FILE (e.g. "
                                  "linux/amd64=./prog), not 'linux/amd64'")
    dup = xcloud("add", "prog", "--version", "0.1", "--command", "true")
    assert dup.returncode == 1
    assert "already has prog version 0.1" in dup.stderr
    assert "Traceback" not in dup.stderr
    rm = xcloud("rm", "prog", "--version", "0.1")
    assert (rm.returncode, rm.stdout.strip()) == (0, "removed 1 version(s) of prog")
    assert grid.store.list_apps(None) == ([], 0)


# ------------------------------------------------------------------ the shell's data verbs


@ONE_BROKER
def test_the_shell_has_data_verbs_and_survives_their_errors(grid: GridHarness,
                                                             tmp_path: Path) -> None:
    grid.start_coordinator()
    client = grid.client("alice", "client")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(client, Console(out, err, False))
    src = make_file(tmp_path / "in.dat", 200_000, seed=9)
    digest = file_sha256(src)

    assert run_line(shell, f"data put {src} inputs/one")
    assert f"stored inputs/one: {digest}  200000 bytes" in out.getvalue()
    assert run_line(shell, "data ls")
    assert "inputs/one" in out.getvalue()
    assert digest[:12] in out.getvalue()
    assert run_line(shell, f"data show {digest[:10]}")
    assert "name:     inputs/one" in out.getvalue()
    assert run_line(shell, f"data get inputs/one {tmp_path / 'back.dat'}")
    assert file_sha256(tmp_path / "back.dat") == digest
    assert run_line(shell, "data pin inputs/one")
    assert [r.pinned for r in client.data.ls()] == [True]
    assert run_line(shell, "data rm inputs/one")  # pinned: refused, the shell goes on
    assert "is pinned: unpin it first" in err.getvalue()
    assert run_line(shell, "data unpin inputs/one")
    assert run_line(shell, "data rm inputs/one")
    assert "removed 1 name(s)" in out.getvalue()
    assert client.data.ls() == []
    # Errors are one line each; the session goes on.
    for line, words in (("data", "usage: data put FILE"),
                        ("data frob x", "unknown data verb 'frob'"),
                        ("data show", "usage: data put FILE"),
                        (f"data put {tmp_path / 'missing'}", "is not a file"),
                        ("data get nothing-here", "you have no data named or hashed")):
        before = err.getvalue()
        assert run_line(shell, line)
        assert words in err.getvalue()[len(before):], line
    assert "Traceback" not in err.getvalue()
    assert "internal error" not in err.getvalue()
    assert run_line(shell, "help data")
    assert "put FILE [NAME], get KEY [PATH]" in out.getvalue()
