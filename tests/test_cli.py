"""The real ``xcloud`` command in subprocesses: help, ``up``, admin, errors.

Every run gets its own ``XCLOUD_HOME`` under ``tmp_path`` and an environment without
stray ``XCLOUD_<SECTION>_*`` settings. Errors must be one clear line on stderr with a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.bus import Bus, BusError
from broker.config import SECTIONS, BusConfig
from client.cli import build_parser
from tests.fixtures.services import free_port, port_open, wait_for

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
    assert bare.returncode == 0 and bare.stdout.startswith("usage: xcloud")


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
        assert table.returncode == 0 and all(r["id"] in table.stdout for r in rows)
        shown = xcloud(home, "show", rows[0]["id"], "--json")
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["id"] == rows[0]["id"] and detail["caps"]["wid"] == rows[0]["id"]
        text = xcloud(home, "show", rows[1]["id"])
        assert text.returncode == 0 and rows[1]["id"] in text.stdout
        assert_clean_error(xcloud(home, "show", "no-such-worker"), "no-such-worker")

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
    assert "xcloud is up" in output and "stopping..." in output
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
    assert "alice" in lines[0] and len(lines[-1]) >= 40  # the token, shown once
    assert admin("add", "bob", "--role", "worker").returncode == 0
    assert_clean_error(admin("add", "alice"), "alice", "already exists")
    assert_clean_error(admin("add", "a/b"), "invalid principal id")

    listed = admin("list")
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["alice"][1] == "client" and rows["bob"][1] == "worker"
    assert lines[-1] not in listed.stdout, "tokens are never listed"

    revoked = admin("revoke", "bob")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert "bob" not in admin("list").stdout
    everyone = admin("list", "--all").stdout
    bob_row = next(line for line in everyone.splitlines() if line.startswith("bob"))
    assert bob_row.split()[4] != "-", bob_row  # the REVOKED column has a date
    assert_clean_error(admin("revoke", "bob"), "bob")
    assert_clean_error(admin("revoke", "nobody"), "nobody")
    again = admin("add", "bob", "--role", "worker")  # a revoked id may be reissued
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] != lines[-1]


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
            assert f"refused principal {pid}" in str(err)
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


# ----------------------------------------------------------------------- client errors


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
