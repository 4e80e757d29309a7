"""The real ``xcloud`` command in subprocesses: help, ``up``, admin, the daemons' entry
points, errors.

Every run gets its own ``XCLOUD_HOME`` under ``tmp_path`` and an environment without
stray ``XCLOUD_<SECTION>_*`` settings. Errors must be one clear line on stderr with a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.bus import Bus, BusError
from broker.config import SECTIONS, BusConfig, load_config
from client.cli import build_parser
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import (
    MariaDBServer,
    free_port,
    port_open,
    require_executable,
    require_service,
    wait_for,
)

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
XCLOUD = [sys.executable, "-m", "client.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    prefixes = tuple(f"XCLOUD_{s.upper()}_" for s in SECTIONS)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(prefixes) and k not in ("XCLOUD_HOME", "XCLOUD_CONFIG",
                                                       "XCLOUD_LOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                        if p)
    env["XCLOUD_HOME"] = str(home)
    env.update(extra)
    return env


def xcloud(home: Path, *args: str, timeout: float = 30, **env: str
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XCLOUD, *args], cwd=REPO, env=cli_env(home, **env),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, no traceback, and one ``xcloud: error:`` line naming ``needles``."""
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------- help


def command_paths(parser: argparse.ArgumentParser,
                  prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from command_paths(sub, (*prefix, name))


def test_help_of_every_command_exits_0(tmp_path: Path) -> None:
    paths = list(command_paths(build_parser()))
    assert {("up",), ("worker",), ("workers",), ("show",), ("admin", "principal", "add")
            } <= set(paths)
    procs = {path: subprocess.Popen([*XCLOUD, *path, "--help"], cwd=REPO,
                                    env=cli_env(tmp_path), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for path in paths}
    failures = []
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0 or not out.startswith("usage: xcloud") or err:
            failures.append((" ".join(path), proc.returncode, err[-500:]))
    assert failures == []
    # bare `xcloud` prints the help too
    bare = xcloud(tmp_path)
    assert bare.returncode == 0
    assert bare.stdout.startswith("usage: xcloud")


# ----------------------------------------------------------------------- xcloud up


def test_up_on_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = xcloud(tmp_path / "home", "up", "--port", str(port), "--workers", "0")
    assert_clean_error(result, str(port), "--port")


def children_of(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_up_runs_a_grid_that_the_cli_sees_and_stops_cleanly(
    tmp_path: Path, measurements: Any,
) -> None:
    home = tmp_path / "home"
    port = free_port()
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([*XCLOUD, "up", "--port", str(port), "--workers", "2"], cwd=REPO,
                          env=cli_env(home, XCLOUD_WORKER_HEARTBEAT_S="0.5"),
                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        started = time.monotonic()

        def two_online() -> list[dict[str, Any]] | None:
            result = xcloud(home, "workers", "--json")
            if result.returncode != 0:
                return None
            rows: list[dict[str, Any]] = json.loads(result.stdout)
            return rows if [r["state"] for r in rows] == ["online", "online"] else None

        rows = wait_for(two_online, 30, interval=0.2,
                        message=f"two online workers; up log:\n{Path(log.name).read_text()}")
        assert rows is not None
        measurements("up_to_two_online_workers", time.monotonic() - started)
        assert [r["index"] for r in rows] == [0, 1]

        table = xcloud(home, "workers")
        assert table.returncode == 0
        assert all(r["id"] in table.stdout for r in rows)
        shown = xcloud(home, "show", rows[0]["id"], "--json")
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["id"] == rows[0]["id"]
        assert detail["caps"]["wid"] == rows[0]["id"]
        text = xcloud(home, "show", rows[1]["id"])
        assert text.returncode == 0
        assert rows[1]["id"] in text.stdout
        assert_clean_error(xcloud(home, "show", "no-such-worker"), "no-such-worker")
        # `show` takes the listing index that `reserveWorker` takes; sizes like `4G`
        # work for `workers --min-memory` as for `run` and the shell (issue 8, item 21).
        by_index = xcloud(home, "show", "1", "--json")
        assert by_index.returncode == 0, by_index.stderr
        assert json.loads(by_index.stdout)["id"] == rows[1]["id"]
        assert_clean_error(xcloud(home, "show", "7"), "no worker #7", "0..1")
        small = xcloud(home, "workers", "--min-memory", "1K", "--json")
        assert small.returncode == 0, small.stderr
        assert len(json.loads(small.stdout)) == 2
        huge = xcloud(home, "workers", "--min-memory", "900T", "--json")
        assert huge.returncode == 0, huge.stderr
        assert json.loads(huge.stdout) == []
        assert_clean_error(xcloud(home, "workers", "--state", "foo"),
                           "unknown state 'foo'; choose online, draining, lost or offline")

        workers = children_of(up.pid)
        assert len(workers) >= 2, workers
        stopping = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0, Path(log.name).read_text()
        measurements("up_sigterm_to_exit", time.monotonic() - stopping)
        wait_for(lambda: all(gone(p) for p in workers), 5,
                 message=f"children left running: {[p for p in workers if not gone(p)]}")
    finally:
        log.close()
        if up.poll() is None:
            up.kill()
            up.wait(10)
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    output = Path(log.name).read_text()
    assert "xcloud is up" in output
    assert "stopping..." in output
    assert "Traceback" not in output, output
    with contextlib.closing(sqlite3.connect(home / "data" / "xcloud.db")) as db:
        states = dict(db.execute("SELECT id, state FROM xc_worker").fetchall())
    assert sorted(states) == sorted(r["id"] for r in rows)
    assert set(states.values()) == {"offline"}, states


# ----------------------------------------------------------------------- admin


def test_admin_principal_add_list_revoke(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = f"sqlite:///{tmp_path / 'admin.db'}"

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return xcloud(home, "admin", "--db", db, "principal", *args)

    added = admin("add", "alice", "--role", "client", "--note", "a user")
    assert added.returncode == 0, added.stderr
    lines = added.stdout.strip().splitlines()
    assert "alice" in lines[0]
    assert len(lines[-1]) >= 40  # the token, shown once
    assert admin("add", "bob", "--role", "worker").returncode == 0
    assert_clean_error(admin("add", "alice"), "alice", "already exists")
    assert_clean_error(admin("add", "a/b"), "invalid principal id")

    listed = admin("list")
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["alice"][1] == "client"
    assert rows["bob"][1] == "worker"
    assert lines[-1] not in listed.stdout, "tokens are never listed"

    revoked = admin("revoke", "bob")
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    assert "bob" not in admin("list").stdout
    everyone = admin("list", "--all").stdout
    bob_row = next(line for line in everyone.splitlines() if line.startswith("bob"))
    assert bob_row.split()[4] != "-", bob_row  # the REVOKED column has a date
    assert_clean_error(admin("revoke", "bob"), "bob")
    assert_clean_error(admin("revoke", "nobody"), "nobody")
    again = admin("add", "bob", "--role", "worker")  # a revoked id may be reissued
    assert again.returncode == 0
    assert again.stdout.strip().splitlines()[-1] != lines[-1]


def test_a_revoked_principal_can_no_longer_connect(tmp_path: Path,
                                                    measurements: Any) -> None:
    home = tmp_path / "home"
    db = f"sqlite:///{tmp_path / 'grid.db'}"

    def add(pid: str) -> str:
        result = xcloud(home, "admin", "--db", db, "principal", "add", pid)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def revoke(pid: str) -> None:
        result = xcloud(home, "admin", "--db", db, "principal", "revoke", pid)
        assert result.returncode == 0, result.stderr

    carol, dave = add("carol"), add("dave")
    port = free_port()
    broker = subprocess.Popen([*XCLOUD, "broker", "--db", db, "--port", str(port)], cwd=REPO,
                              env=cli_env(home), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    url = f"mqtt://127.0.0.1:{port}"

    def connect(pid: str, token: str) -> None:
        bus = Bus(BusConfig(url=url, principal=pid, token=token, reconnect_max_s=1.0))
        bus.start(timeout=5)
        bus.stop()

    def refused(pid: str, token: str) -> bool:
        try:
            connect(pid, token)
        except BusError as err:
            assert f"refused principal {pid}" in str(err)  # noqa: PT017 (a probe)
            return True
        return False

    try:
        wait_for(lambda: port_open("127.0.0.1", port), 15, message="xcloud broker listening")
        connect("dave", dave)
        revoke("carol")
        assert refused("carol", carol), "carol was revoked before she ever connected"
        revoked_at = time.monotonic()
        revoke("dave")
        # The broker caches good logins for 5 s (auth_cache_ttl_s): a revoked token that
        # was just used may work that long, and not longer.
        wait_for(lambda: refused("dave", dave), 10, interval=0.5,
                 message="dave's revoked token still accepted")
        measurements("revoked_token_refused_after", time.monotonic() - revoked_at)
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(15) == 0
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
        if broker.stdout:
            broker.stdout.close()


# ----------------------------------------------------------------------- daemons


def stop_daemon(proc: subprocess.Popen[str], *, timeout: float = 30) -> str:
    """SIGTERM ``proc`` (a daemon in its own session), wait for it; its whole output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return out


def daemon(home: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*XCLOUD, *args], cwd=REPO, env=cli_env(home, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """Lines of ``proc``'s output up to the one holding ``needle`` (the daemon runs on)."""
    assert proc.stdout is not None
    seen: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    wait_for(lambda: found.is_set() or proc.poll() is not None, timeout,
             message=f"{needle!r} in the output of {proc.args!r}")
    assert found.is_set(), f"exited {proc.returncode} without {needle!r}:\n{''.join(seen)}"
    return "".join(seen)


@pytest.fixture
def password_db_url(mariadb_server: MariaDBServer, fresh_mariadb_url: str) -> Iterator[str]:
    """A MariaDB URL with a user that has a password (the database of ``fresh_mariadb_url``)."""
    database = fresh_mariadb_url.rsplit("/", 1)[1]
    user, password = f"xc_{os.urandom(4).hex()}", f"Pw-{os.urandom(8).hex()}"
    conn = mariadb_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
            cur.execute(f"GRANT ALL ON `{database}`.* TO '{user}'@'%'")
        yield (f"mysql://{user}:{password}@{mariadb_server.host}:{mariadb_server.port}/"
               f"{database}")
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        conn.close()


@pytest.mark.mariadb
def test_database_passwords_never_reach_the_output(tmp_path: Path, password_db_url: str
                                                   ) -> None:
    """`xcloud coordinator` and `xcloud up` used to print the database URL, password
    included (and so into container logs)."""
    password = password_db_url.split(":")[2].split("@")[0]
    home = tmp_path / "home"
    env = {"XCLOUD_LOG_LEVEL": "DEBUG", "XCLOUD_BUS_PRINCIPAL": "coordinator",
           "XCLOUD_BUS_TOKEN": "t"}
    coordinator = daemon(home, "coordinator", "--db", password_db_url,
                         "--broker", f"mqtt://127.0.0.1:{free_port()}", **env)
    shown = ""
    try:
        shown = read_until(coordinator, "coordinator running")
    finally:
        shown += stop_daemon(coordinator)
    assert "database mysql://" in shown, shown
    assert ":***@" in shown, shown
    assert password not in shown, shown

    up = daemon(home, "up", "--db", password_db_url, "--port", str(free_port()),
                "--workers", "0", XCLOUD_LOG_LEVEL="DEBUG")
    shown = ""
    try:
        shown = read_until(up, "Stop with Ctrl-C")
    finally:
        shown += stop_daemon(up)
    assert "xcloud is up" in shown, shown
    assert ":***@" in shown, shown
    assert password not in shown, shown


def test_embedded_broker_of_the_coordinator_honours_allow_anonymous(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    added = xcloud(home, "admin", "--db", db, "principal", "add", "coordinator",
                   "--role", "coordinator")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]

    def anonymous_admitted(*flags: str, **env: str) -> bool:
        port = free_port()
        proc = daemon(home, "coordinator", "--embed-broker", "--port", str(port), "--db", db,
                      *flags, XCLOUD_BUS_PRINCIPAL="coordinator", XCLOUD_BUS_TOKEN=token, **env)
        try:
            read_until(proc, "coordinator running")
            bus = Bus(BusConfig(url=f"mqtt://127.0.0.1:{port}", reconnect_max_s=1.0))
            try:
                bus.start(timeout=5)
            except BusError as err:
                assert "refused principal (anonymous)" in str(err), err  # noqa: PT017 (a probe)
                return False
            bus.stop()
            return True
        finally:
            out = stop_daemon(proc)
            assert "Traceback" not in out, out

    assert not anonymous_admitted()
    assert anonymous_admitted("--allow-anonymous")
    assert anonymous_admitted(XCLOUD_BROKER_ALLOW_ANONYMOUS="true")


def test_a_worker_whose_parent_is_gone_does_not_start(tmp_path: Path) -> None:
    gone_child = subprocess.Popen(["true"])
    gone_child.wait()
    result = xcloud(tmp_path / "home", "worker", "--parent-pid", str(gone_child.pid),
                    XCLOUD_BUS_PRINCIPAL="w1", XCLOUD_BUS_TOKEN="t")
    assert_clean_error(result, f"parent process {gone_child.pid} is gone")


PARENT = """
import subprocess, sys, os, signal
child = subprocess.Popen(sys.argv[1:] + ["--parent-pid", str(os.getpid())],
                         stdin=subprocess.DEVNULL)
print(child.pid, flush=True)
signal.pause()
"""


def test_a_worker_dies_with_its_parent(grid: GridHarness, tmp_path: Path) -> None:
    """What keeps `xcloud up`'s workers from outliving it, without a preexec_fn: the
    worker asks for its parent's death signal itself."""
    grid.start_coordinator()
    token = grid.token("w-orphan", "worker")
    env = grid.subprocess_env(XCLOUD_HOME=str(tmp_path / "home"),
                              XCLOUD_BUS_PRINCIPAL="w-orphan", XCLOUD_BUS_TOKEN=token)
    log = (tmp_path / "worker.log").open("w")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, *XCLOUD, "worker", "--broker", grid.url, "--root",
         grid.root, "--state-dir", str(tmp_path / "state"), "--heartbeat", "0.2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
        text=True, start_new_session=True)
    worker: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        worker = psutil.Process(int(parent.stdout.readline()))
        grid.wait_worker("w-orphan", "online", timeout=30)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: gone(worker), 15, message="the worker outlived its parent")
        grid.wait_worker("w-orphan", "offline")  # it left cleanly (SIGTERM), no will
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if worker is not None and not gone(worker):
            worker.kill()
        log.close()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_up_killed_takes_its_workers_along(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = subprocess.Popen([*XCLOUD, "up", "--port", str(free_port()), "--workers", "1"],
                          cwd=REPO, env=cli_env(home, XCLOUD_WORKER_HEARTBEAT_S="0.5"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        def online() -> bool:
            result = xcloud(home, "workers", "--json")
            return result.returncode == 0 and [r["state"] for r in json.loads(result.stdout)
                                               ] == ["online"]

        wait_for(online, 30, interval=0.2, message="a worker online")
        workers = children_of(up.pid)
        assert any("--parent-pid" in p.cmdline() for p in workers), workers
        # The broker runs in a process of its own (broker.own_process) and goes too.
        assert any(is_broker(p) for p in workers), workers
        up.kill()
        up.wait(10)
        wait_for(lambda: all(gone(p) for p in workers), 20,
                 message=f"workers outlived `xcloud up`: {workers}")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                proc.kill()


# ----------------------------------------------------------------------- client errors


def is_broker(proc: psutil.Process) -> bool:
    """``xcloud broker`` (a worker's command line has ``--broker URL``, not this)."""
    with contextlib.suppress(psutil.Error):
        cmd = proc.cmdline()
        return "client.cli" in cmd and cmd[cmd.index("client.cli") + 1:][:1] == ["broker"]
    return False


def test_a_broker_whose_parent_is_gone_does_not_start(tmp_path: Path) -> None:
    gone_child = subprocess.Popen(["true"])
    gone_child.wait()
    result = xcloud(tmp_path / "home", "broker", "--port", "0", "--parent-pid",
                    str(gone_child.pid))
    assert result.returncode == 1
    assert f"parent process {gone_child.pid} is gone" in result.stderr
    assert "broker listening" not in result.stdout


def up_grid(home: Path, *, workers: int = 1, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*XCLOUD, "up", "--port", str(free_port()), "--workers", str(workers), "--no-http"],
        cwd=REPO, env=cli_env(home, XCLOUD_WORKER_HEARTBEAT_S="0.5", **env),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)


def worker_states(home: Path) -> list[str] | None:
    result = xcloud(home, "workers", "--json")
    if result.returncode != 0:
        return None
    return [r["state"] for r in json.loads(result.stdout)]


def stop_up(up: subprocess.Popen[bytes], children: list[psutil.Process]) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
    for proc in children:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def test_up_restarts_its_broker_process_and_the_grid_comes_back(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = up_grid(home)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: worker_states(home) == ["online"], 30, interval=0.2,
                 message="a worker online")
        children = children_of(up.pid)
        brokers = [p for p in children if is_broker(p)]
        assert len(brokers) == 1, children
        brokers[0].kill()
        wait_for(lambda: gone(brokers[0]), 10, message="the broker did not die")
        # A new broker process on the same port; the coordinator and the worker
        # reconnect, and the CLI (same config) sees the worker again.
        wait_for(lambda: [p for p in children_of(up.pid)
                          if is_broker(p) and p.pid != brokers[0].pid], 20,
                 interval=0.2, message="no new broker process")
        wait_for(lambda: worker_states(home) == ["online"], 60, interval=0.3,
                 message="the worker online again after the broker's restart")
        children = children_of(up.pid)
    finally:
        stop_up(up, children)
    assert up.returncode == 0


def test_up_with_the_broker_in_its_own_thread(tmp_path: Path) -> None:
    """``broker.own_process = false``: the embedded broker as a thread of ``xcloud up``."""
    home = tmp_path / "home"
    up = up_grid(home, XCLOUD_BROKER_OWN_PROCESS="false")
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: worker_states(home) == ["online"], 30, interval=0.2,
                 message="a worker online")
        children = children_of(up.pid)
        assert not [p for p in children if is_broker(p)], children
    finally:
        stop_up(up, children)
    assert up.returncode == 0


def test_workers_without_configuration_is_a_clear_error(tmp_path: Path) -> None:
    assert_clean_error(xcloud(tmp_path / "empty-home", "workers"), "no client credentials",
                       "xcloud up")


def test_workers_against_a_dead_broker_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    url = f"mqtt://127.0.0.1:{free_port()}"
    (home / "config.toml").write_text(
        f'[bus]\nurl = "{url}"\nprincipal = "admin"\ntoken = "t"\nconnect_timeout_s = 1.0\n')
    started = time.monotonic()
    result = xcloud(home, "workers")
    assert_clean_error(result, url)
    assert time.monotonic() - started < 15


# ----------------------------------------------------------------------- newcomer's path
# Issue 8, items 16, 17, 19, 21: what a new user hit following the README.


def test_common_options_come_before_or_after_the_command(tmp_path: Path) -> None:
    before = xcloud(tmp_path / "elsewhere", "--home", str(tmp_path / "a"), "workers")
    after = xcloud(tmp_path / "elsewhere", "workers", "--home", str(tmp_path / "b"))
    assert_clean_error(before, str(tmp_path / "a" / "config.toml"))
    assert_clean_error(after, str(tmp_path / "b" / "config.toml"))
    both = xcloud(tmp_path / "elsewhere", "--home", str(tmp_path / "a"), "workers",
                  "--home", str(tmp_path / "b"))  # the later one wins
    assert_clean_error(both, str(tmp_path / "b" / "config.toml"))
    version = xcloud(tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("xcloud 0."), version.stdout


def test_one_shot_commands_print_no_warnings_before_the_error(tmp_path: Path) -> None:
    """A refused CONNECT used to print a WARNING line, then the error saying the same."""
    home = tmp_path / "home"
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    port = free_port()
    broker = daemon(home, "broker", "--db", db, "--port", str(port))
    try:
        read_until(broker, "broker listening")
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[bus]\nurl = "mqtt://127.0.0.1:{port}"\nprincipal = "admin"\ntoken = "wrong"\n')
        result = xcloud(home, "workers")
        line = assert_clean_error(result, "refused principal admin")
        assert result.stderr.strip().splitlines() == [line], result.stderr
        verbose = xcloud(home, "-v", "workers")  # -v shows what happened on the way
        assert "WARNING" in verbose.stderr, verbose.stderr
    finally:
        out = stop_daemon(broker)
    assert "Traceback" not in out, out


def test_xcloud_worker_says_when_it_is_online(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    token = grid.token("w-says", "worker")
    worker = daemon(tmp_path / "home", "worker", "--broker", grid.url, "--root", grid.root,
                    "--state-dir", str(tmp_path / "state"), "--heartbeat", "0.2",
                    XCLOUD_BUS_PRINCIPAL="w-says", XCLOUD_BUS_TOKEN=token)
    shown = ""
    try:
        shown = read_until(worker, "online")
        grid.wait_worker("w-says", "online")
    finally:
        shown += stop_daemon(worker)
    assert f"worker w-says online at {grid.url}" in shown, shown
    assert "Traceback" not in shown, shown


def up_daemon(home: Path, port: int, *args: str) -> subprocess.Popen[str]:
    proc = daemon(home, "up", "--port", str(port), "--workers", "0", *args)
    read_until(proc, "Stop with Ctrl-C")
    return proc


def test_a_second_up_on_the_same_home_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    first = up_daemon(home, port)
    try:
        config_before = (home / "config.toml").read_bytes()
        second = xcloud(home, "up", "--port", str(free_port()), "--workers", "0")
        line = assert_clean_error(second, "a grid already runs in", str(home),
                                  f"pid {first.pid}", f"mqtt://127.0.0.1:{port}")
        assert "--home" in line
        # The first grid is untouched: same client config, its admin token still works.
        assert (home / "config.toml").read_bytes() == config_before
        listed = xcloud(home, "admin", "principal", "list")
        assert listed.returncode == 0, listed.stderr
        assert first.poll() is None
    finally:
        out = stop_daemon(first)
    assert "Traceback" not in out, out
    # Once the first one stopped, the home is free again.
    again = up_daemon(home, free_port())
    stop_daemon(again)


def test_a_restarted_grid_keeps_the_client_config_and_its_sessions(tmp_path: Path) -> None:
    """`xcloud up` used to issue a new admin token and rewrite [bus] on every start: an
    open shell could not reconnect, and settings added to config.toml were lost."""
    from client.api import Grid

    home = tmp_path / "home"
    port = free_port()
    up = up_daemon(home, port)
    path = home / "config.toml"
    text = path.read_text()
    assert "[bus]" in text
    path.write_text(text.replace("[bus]\n", "[bus]\nrequest_timeout_s = 7.5\n")
                    + '\n[client]\ncolor = "never"\n')
    edited = path.read_bytes()
    session = Grid.connect(load_config(env=cli_env(home)))
    try:
        assert session.config.bus.request_timeout_s == 7.5
        assert session.workers() == []
        stop_daemon(up)
        wait_for(lambda: not session.connected, 15, message="the grid went away")
        up = up_daemon(home, port)
        assert path.read_bytes() == edited, path.read_text()
        wait_for(lambda: session.connected, 30, interval=0.2,
                 message="the open session reconnected to the restarted grid")
        wait_for(lambda: session.coordinator is not None and session.coordinator.up, 15,
                 message="the coordinator is up")
        assert session.workers() == []
    finally:
        session.close()
        out = stop_daemon(up)
    assert "Traceback" not in out, out


def test_mosquitto_export_is_readable_by_debians_mosquitto(tmp_path: Path) -> None:
    """Mosquitto drops to user `mosquitto` before reading its password file and ACL: the
    export used to write them 0600 for root, and Mosquitto would not start."""
    binary = require_executable("mosquitto")
    if os.geteuid() != 0:
        require_service("root", "Mosquitto drops privileges only when started as root")
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        require_service("mosquitto group", "Debian's mosquitto package creates it")
    db = f"sqlite:///{tmp_path / 'grid.db'}"
    added = xcloud(tmp_path / "home", "admin", "--db", db, "principal", "add", "alice")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    shared = Path(tempfile.mkdtemp(prefix="xcloud-mosquitto-"))  # not pytest's 0700 dirs
    try:
        shared.chmod(0o755)
        exported = xcloud(tmp_path / "home", "admin", "--db", db, "mosquitto-export",
                          str(shared / "auth"))
        assert exported.returncode == 0, exported.stderr
        for name in ("passwd", "acl"):
            info = (shared / "auth" / name).stat()
            assert info.st_gid == gid, name
            assert stat.S_IMODE(info.st_mode) == 0o640, name
        port = free_port()
        conf = shared / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                        f"password_file {shared / 'auth' / 'passwd'}\n"
                        f"acl_file {shared / 'auth' / 'acl'}\npersistence false\n"
                        "log_dest stderr\n")  # no `user` line: it becomes `mosquitto`
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 15,
                     message="mosquitto listening")
            assert proc.poll() is None, proc.communicate()[1]
            bus = Bus(BusConfig(url=f"mqtt://127.0.0.1:{port}", principal="alice",
                                token=token, reconnect_max_s=1.0))
            bus.start(timeout=10)
            bus.stop()
        finally:
            proc.terminate()
            proc.communicate(timeout=10)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
