"""Who a worker is, and what it offers, across restarts (issue 8 item 14).

- the identity comes from the state dir or from what the worker is given explicitly
  (flags, XCLOUD_BUS_* environment, code), never from the ``[bus]`` section of a config
  file: that is the client's (``xcloud up`` writes its admin there);
- an explicit identity is saved only once the broker accepted it;
- name, description, tags and slots are kept in the state dir: a restart without flags
  keeps them, flags override them and are saved.

The unit tests work on the files; the grid tests (both brokers, each with real
authentication) run the agent and ``xcloud worker`` itself, as the README tells users to.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.bus import BusError
from broker.config import BusConfig, Config, load_config
from coordinator.store import WorkerRecord
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.services import wait_for
from worker.agent import WorkerAgent
from worker.errors import IdentityError
from worker.identity import (
    explicit_bus_identity,
    identity_path,
    load_identity,
    save_identity,
)
from worker.settings import SETTINGS_FILE, effective_settings, read_settings

# ------------------------------------------------------------------------ the files


def test_missing_identity_tells_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path, BusConfig())
    text = str(info.value)
    assert "xcloud admin principal add NAME --role worker" in text
    assert "--id NAME --token TOKEN" in text
    assert "xcloud up" in text


def test_an_explicit_identity_is_not_saved_until_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity = load_identity(state, BusConfig(principal="w-lab7", token="s3cret"))
    assert (identity.wid, identity.token, identity.saved) == ("w-lab7", "s3cret", False)
    assert not identity_path(state).exists()
    assert identity.save_accepted(state)
    path = identity_path(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert (doc["wid"], doc["token"]) == ("w-lab7", "s3cret")
    created = doc["created_at"]
    # a restart without flags comes back as the same worker, nothing to save
    again = load_identity(state, BusConfig())
    assert (again.wid, again.token, again.saved) == ("w-lab7", "s3cret", True)
    # an explicit id without a token reuses the stored token of that id
    same = load_identity(state, BusConfig(principal="w-lab7"))
    assert (same.token, same.saved) == ("s3cret", True)
    assert not same.save_accepted(state)
    assert json.loads(path.read_text())["created_at"] == created


def test_a_new_explicit_identity_leaves_the_stored_one_until_accepted(tmp_path: Path) -> None:
    save_identity(tmp_path, "old", "t1")
    new = load_identity(tmp_path, BusConfig(principal="new", token="t2"))
    assert (new.wid, new.saved) == ("new", False)
    assert load_identity(tmp_path, BusConfig()).wid == "old"  # not accepted yet
    new.save_accepted(tmp_path)
    assert load_identity(tmp_path, BusConfig()).token == "t2"
    rotated = load_identity(tmp_path, BusConfig(token="t3"))  # a token alone: same id
    assert (rotated.wid, rotated.token, rotated.saved) == ("new", "t3", False)
    assert load_identity(tmp_path, BusConfig()).token == "t2"


def test_bad_identities_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="invalid worker id"):
        load_identity(tmp_path, BusConfig(principal="a/b"))
    identity_path(tmp_path).write_text("{not json")
    with pytest.raises(IdentityError, match="not valid JSON"):
        load_identity(tmp_path, BusConfig())
    identity_path(tmp_path).write_text('{"token": "x"}')
    with pytest.raises(IdentityError, match="malformed"):
        load_identity(tmp_path, BusConfig())
    # an explicit id replaces a broken file once accepted
    load_identity(tmp_path, BusConfig(principal="w1", token="t")).save_accepted(tmp_path)
    assert load_identity(tmp_path, BusConfig()).wid == "w1"


def _client_config(home: Path) -> Path:
    """The config.toml `xcloud up` leaves: the admin's credentials in [bus]."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text('[bus]\nurl = "mqtt://127.0.0.1:1"\nprincipal = "admin"\n'
                    'token = "the-admin-token"\n')
    return path


def test_the_client_identity_of_the_config_file_is_never_the_workers(tmp_path: Path) -> None:
    path = _client_config(tmp_path / "home")
    env = {"XCLOUD_HOME": str(tmp_path / "home")}
    state = tmp_path / "state"
    save_identity(state, "lab-pc", "worker-token")
    config = load_config(path, env=env)
    assert config.bus.principal == "admin"  # what a client reads
    bus = explicit_bus_identity(config)
    assert (bus.principal, bus.token, bus.url) == ("", "", "mqtt://127.0.0.1:1")
    identity = load_identity(state, bus)
    assert (identity.wid, identity.token, identity.saved) == ("lab-pc", "worker-token", True)
    # flags and the environment are explicit: they are the worker's
    flagged = load_config(path, env=env, overrides={"bus": {"principal": "lab-2",
                                                            "token": "t2"}})
    assert explicit_bus_identity(flagged).principal == "lab-2"
    from_env = load_config(path, env={**env, "XCLOUD_BUS_PRINCIPAL": "lab-3",
                                      "XCLOUD_BUS_TOKEN": "t3"})
    assert (explicit_bus_identity(from_env).principal,
            explicit_bus_identity(from_env).token) == ("lab-3", "t3")
    # the worker's own keys ([worker] in its config file: docker/provision.sh writes
    # them so), and the flags beat those
    (tmp_path / "worker.toml").write_text(
        '[bus]\nurl = "mqtt://127.0.0.1:1"\n[worker]\nprincipal = "w-4"\ntoken = "t4"\n')
    own = load_config(tmp_path / "worker.toml", env=env)
    assert (explicit_bus_identity(own).principal, explicit_bus_identity(own).token) == (
        "w-4", "t4")
    assert "t4" not in repr(own.worker)
    beaten = load_config(tmp_path / "worker.toml", env=env,
                         overrides={"bus": {"principal": "w-5", "token": "t5"}})
    assert explicit_bus_identity(beaten).principal == "w-5"
    # a config made in code (tests, embedding) is explicit too
    coded = Config()
    coded.bus.principal = "w9"
    assert explicit_bus_identity(coded).principal == "w9"


def test_settings_are_kept_until_given_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_config(tmp_path / "none.toml", env={}, overrides={"worker": {
        "tags": "fast,ssd", "slots": 2, "description": "lab PC under the desk",
        "name": "lab"}})
    worker = effective_settings(first, state)
    assert (worker.tags, worker.slots, worker.description, worker.name) == (
        ["fast", "ssd"], 2, "lab PC under the desk", "lab")
    assert stat.S_IMODE((state / SETTINGS_FILE).stat().st_mode) == 0o600
    # a restart without flags keeps them
    bare = effective_settings(load_config(tmp_path / "none.toml", env={}), state)
    assert (bare.tags, bare.slots, bare.description, bare.name) == (
        ["fast", "ssd"], 2, "lab PC under the desk", "lab")
    # a flag overrides (even back to the default) and is saved; the rest is kept
    one = load_config(tmp_path / "none.toml", env={}, overrides={"worker": {"slots": 1}})
    assert effective_settings(one, state).slots == 1
    assert read_settings(state)["slots"] == 1
    assert read_settings(state)["tags"] == ["fast", "ssd"]
    # so does the environment
    env = load_config(tmp_path / "none.toml", env={"XCLOUD_WORKER_TAGS": "gpu"})
    assert effective_settings(env, state).tags == ["gpu"]
    # a broken file counts as none
    (state / SETTINGS_FILE).write_text("{broken")
    assert effective_settings(load_config(tmp_path / "none.toml", env={}), state).tags == []


# ------------------------------------------------------------------------ on a grid


def test_a_refused_identity_is_never_saved(grid: GridHarness, tmp_path: Path) -> None:
    good = grid.token("lab-pc", "worker")
    state = tmp_path / "lab-state"
    save_identity(state, "lab-pc", good)
    typo = grid.config_for("lab-pc", "worker")
    typo.bus.token = good[:-2] + "xx"
    with pytest.raises(BusError, match="refused"):
        WorkerAgent(typo, state_dir=state, remote_exec=False).start(timeout=5)
    assert json.loads(identity_path(state).read_text())["token"] == good
    other = grid.config_for("lab-2", "worker")  # another principal: refused too
    other.bus.token = "not-its-token"
    with pytest.raises(BusError, match="refused"):
        WorkerAgent(other, state_dir=state, remote_exec=False).start(timeout=5)
    assert json.loads(identity_path(state).read_text())["wid"] == "lab-pc"
    # an accepted one is saved, and is what the next start without flags uses
    agent = WorkerAgent(grid.config_for("lab-2", "worker"), state_dir=state,
                        remote_exec=False)
    agent.start(timeout=5)
    try:
        wait_for(lambda: json.loads(identity_path(state).read_text())["wid"] == "lab-2",
                 message="the accepted identity was not saved")
    finally:
        agent.stop()


def _worker_cli(grid: GridHarness, home: Path, state: Path, *args: str
                ) -> subprocess.Popen[bytes]:
    log = (home / "worker.log").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "client.cli", "worker", "--state-dir", str(state),
             "--heartbeat", "0.2", *args],
            cwd=REPO, env=grid.subprocess_env(XCLOUD_HOME=str(home)),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _wait_online(grid: GridHarness, home: Path, proc: subprocess.Popen[bytes]
                 ) -> WorkerRecord:
    """lab-pc online; otherwise fail with what the worker printed (and whether it ran)."""
    try:
        return grid.wait_worker("lab-pc", "online", timeout=20)
    except AssertionError as err:
        log = (home / "worker.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{err}\nworker exit code {proc.poll()}; its log:\n{log}"
                             ) from None


def test_the_readme_add_a_worker_steps_on_the_xcloud_up_machine(
        grid: GridHarness, tmp_path: Path) -> None:
    # The machine where `xcloud up` runs: config.toml holds the admin's credentials.
    grid.start_coordinator()
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[bus]\nurl = "{grid.url}"\nroot = "{grid.root}"\nprincipal = "admin"\n'
        f'token = "{grid.token("admin", "admin")}"\n')
    token = grid.token("lab-pc", "worker")  # `xcloud admin principal add lab-pc --role worker`
    state = home / "worker"
    proc = _worker_cli(grid, home, state, "--id", "lab-pc", "--token", token,
                       "--tags", "fast,ssd", "--slots", "2",
                       "--description", "lab PC under the desk")
    try:
        record = _wait_online(grid, home, proc)
        assert (record.tags, record.slots, record.description) == (
            ["fast", "ssd"], 2, "lab PC under the desk")
        proc.terminate()
        assert proc.wait(20) == 0
        grid.wait_worker("lab-pc", "offline")
        # "The worker keeps its identity in its state directory, so later starts need
        # no token": started again without flags, it is lab-pc, with what it offered.
        proc = _worker_cli(grid, home, state)
        record = _wait_online(grid, home, proc)
        assert (record.tags, record.slots, record.description) == (
            ["fast", "ssd"], 2, "lab PC under the desk")
        assert grid.worker_record("admin") is None
        doc = json.loads(identity_path(state).read_text())
        assert (doc["wid"], doc["token"]) == ("lab-pc", token)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)
