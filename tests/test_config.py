"""Configuration: defaults < TOML file < XCLOUD_* environment < flags, and its errors."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from broker.config import (
    BusConfig,
    Config,
    ConfigError,
    load_config,
    write_config,
)
from schemas.errors import XcloudError


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "missing.toml", env={})
    assert cfg.bus == BusConfig()
    assert cfg.bus.url == "mqtt://127.0.0.1:1883"
    assert cfg.bus.root == "xcloud"
    assert cfg.coordinator.liveness_factor == 2.0
    assert cfg.worker.heartbeat_s == 5.0
    assert cfg.worker.tags == []
    assert cfg.broker.allow_anonymous is False


def test_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = toml(tmp_path, """
[bus]
url = "mqtt://file:1"
root = "fileroot"
keepalive = 11
principal = "file-user"

[worker]
tags = ["a", "b"]
heartbeat_s = 2.5
slots = 3

[broker]
allow_anonymous = true
""")
    env = {"XCLOUD_BUS_ROOT": "envroot", "XCLOUD_BUS_KEEPALIVE": "22",
           "XCLOUD_WORKER_TAGS": "x, y,,z", "XCLOUD_BROKER_ALLOW_ANONYMOUS": "no",
           "XCLOUD_WORKER_SLOTS": "4", "XCLOUD_BUS_NOT_A_SETTING": "ignored"}
    flags = {"bus": {"keepalive": 33, "url": None, "principal": None},
             "worker": {"slots": 5, "tags": None}}
    cfg = load_config(path, env=env, overrides=flags)
    assert cfg.bus.url == "mqtt://file:1"          # file only
    assert cfg.bus.principal == "file-user"        # a None flag does not mask the file
    assert cfg.bus.root == "envroot"               # env beats file
    assert cfg.bus.keepalive == 33                 # flag beats env and file
    assert cfg.worker.tags == ["x", "y", "z"]      # env list: comma-separated, trimmed
    assert cfg.worker.heartbeat_s == 2.5
    assert cfg.worker.slots == 5
    assert cfg.broker.allow_anonymous is False     # "no" is false
    assert cfg.bus.token == ""                     # default
    # file alone
    only_file = load_config(path, env={})
    assert (only_file.bus.root, only_file.bus.keepalive, only_file.worker.slots) == (
        "fileroot", 11, 3)


def test_home_and_config_file_come_from_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[bus]\nroot = "homeroot"\n')
    cfg = load_config(env={"XCLOUD_HOME": str(home)})
    assert cfg.home == home
    assert cfg.bus.root == "homeroot"
    assert cfg.data_dir == home / "data"
    assert cfg.db_url == f"sqlite:///{home / 'data' / 'xcloud.db'}"
    assert cfg.worker_state_dir == home / "worker"
    other = toml(tmp_path, '[bus]\nroot = "explicit"\n')
    cfg = load_config(env={"XCLOUD_HOME": str(home), "XCLOUD_CONFIG": str(other)})
    assert cfg.bus.root == "explicit"


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_true_spellings(value: str, tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "none.toml", env={"XCLOUD_BROKER_ALLOW_ANONYMOUS": value})
    assert cfg.broker.allow_anonymous is True


@pytest.mark.parametrize(("where", "text", "env", "needle"), [
    ("file", '[bus]\nkeepalive = "abc"\n', {}, "[bus] keepalive"),
    ("file", "[bus]\nkeepalive = true\n", {}, "[bus] keepalive"),
    ("file", '[worker]\ntags = "a"\nslots = [1]\n', {}, "[worker] slots"),
    ("file", "[worker]\nheartbeat_s = {a = 1}\n", {}, "[worker] heartbeat_s"),
    ("file", "[broker]\nallow_anonymous = 2\n", {}, "[broker] allow_anonymous"),
    ("file", "[bus]\nurl = [1, 2]\n", {}, "[bus] url"),
    ("file", "[worker]\ntags = 5\n", {}, "[worker] tags"),
    ("env", "", {"XCLOUD_BUS_KEEPALIVE": "thirty"}, "environment [bus] keepalive"),
    ("env", "", {"XCLOUD_WORKER_HEARTBEAT_S": "soon"}, "environment [worker] heartbeat_s"),
    ("env", "", {"XCLOUD_BROKER_ALLOW_ANONYMOUS": "maybe"}, "allow_anonymous"),
])
def test_bad_values_are_config_errors_naming_the_setting(
    tmp_path: Path, where: str, text: str, env: dict[str, str], needle: str,
) -> None:
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    message = str(info.value)
    assert needle in message
    assert "bad value" in message
    if where == "file":
        assert str(path) in message
    assert isinstance(info.value, XcloudError)


def test_bad_flag_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"flags \[worker\] slots"):
        load_config(tmp_path / "none.toml", env={}, overrides={"worker": {"slots": "many"}})


def test_unknown_sections_and_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[buss\]"):
        load_config(toml(tmp_path, '[buss]\nurl = "x"\n'), env={})
    with pytest.raises(ConfigError, match=r"unknown setting \[bus\] ulr"):
        load_config(toml(tmp_path, '[bus]\nulr = "x"\n'), env={})
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(toml(tmp_path, 'url = "top-level key"\n'), env={})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(tmp_path / "none.toml", env={}, overrides={"bus": {"nope": 1}})


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    path = toml(tmp_path, "[bus\nurl = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path, env={})


def test_dashes_in_keys_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(toml(tmp_path, "[bus]\nrequest-timeout-s = 3.5\n"), env={})
    assert cfg.bus.request_timeout_s == 3.5


def test_write_config_keeps_other_sections_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    path.parent.mkdir()
    path.write_text('[worker]\ntags = ["keep"]\nslots = 2\n\n[bus]\nurl = "old"\nroot = "r"\n')
    path.chmod(0o644)
    write_config(path, {"bus": {"url": "mqtt://127.0.0.1:9", "principal": "admin",
                                "token": 'to"k\\en', "keepalive": 7}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = tomllib.loads(path.read_text())
    assert data["worker"] == {"tags": ["keep"], "slots": 2}
    # the given section is replaced as a whole
    assert data["bus"] == {"url": "mqtt://127.0.0.1:9", "principal": "admin",
                           "token": 'to"k\\en', "keepalive": 7}
    cfg = load_config(path, env={})
    assert cfg.bus.token == 'to"k\\en'
    assert cfg.worker.tags == ["keep"]
    assert not list(path.parent.glob("*.tmp")), "no temporary file left behind"


def test_write_config_creates_the_file_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "home" / "config.toml"
    write_config(path, {"bus": {"root": "r1", "reconnect_max_s": 2.5},
                        "broker": {"allow_anonymous": False}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load_config(path, env={})
    assert cfg.bus.root == "r1"
    assert cfg.bus.reconnect_max_s == 2.5
    assert cfg.broker.allow_anonymous is False


def test_write_config_round_trips_control_characters(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    write_config(path, {"worker": {"description": "line one\nline two\ttab"}})
    assert load_config(path, env={}).worker.description == "line one\nline two\ttab"


def test_config_defaults_are_independent_instances() -> None:
    a, b = Config(), Config()
    a.worker.tags.append("x")
    assert b.worker.tags == []


@pytest.mark.parametrize(("text", "env"), [
    ("[bus]\nkeepalive = 1.9\n", {}),
    ("", {"XCLOUD_COORDINATOR_LIVENESS_FACTOR": "nan"}),
    ("", {"XCLOUD_WORKER_HEARTBEAT_S": "inf"}),
], ids=["float-for-int", "nan", "inf"])
def test_lossy_or_non_finite_numbers_are_refused(
    tmp_path: Path, text: str, env: dict[str, str],
) -> None:
    with pytest.raises(ConfigError):
        load_config(toml(tmp_path, text), env=env)
