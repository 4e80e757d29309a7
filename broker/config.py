"""Configuration for every xcloud component, in one place.

Layers, lowest to highest: dataclass defaults < TOML file < ``XCLOUD_<SECTION>_<KEY>``
environment variables < command-line flags. The TOML file is ``$XCLOUD_CONFIG`` or
``$XCLOUD_HOME/config.toml`` (home defaults to ``~/.xcloud``); its tables are named like
the sections below (``[bus]``, ``[broker]``, ``[coordinator]``, ``[worker]``, ``[client]``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import XcloudError
from schemas.topics import DEFAULT_ROOT


class ConfigError(XcloudError):
    """A configuration value that cannot be used (bad type, unreadable file, ...)."""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (over-masks rather than leak).

    The one masking function: every log line, error and summary that shows a database or
    broker URL goes through it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostpart}"


def default_home() -> Path:
    return Path(os.environ.get("XCLOUD_HOME") or Path.home() / ".xcloud").expanduser()


@dataclass
class BusConfig:
    """How a component reaches the MQTT broker and who it is there."""

    url: str = "mqtt://127.0.0.1:1883"
    principal: str = ""
    token: str = ""
    root: str = DEFAULT_ROOT
    keepalive: int = 30
    # Reconnect back-off: doubles from min to max, each wait cut by a random 0-50 % so a
    # grid's components do not all reconnect at one instant (broker.bus.backoff_delay).
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 3.0
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    max_payload: int = 4 * 1024 * 1024


@dataclass
class BrokerConfig:
    """The embedded amqtt broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    ws_port: int = 0  # 0 = no WebSocket listener
    allow_anonymous: bool = False
    # `xcloud up` runs the broker in a process of its own (not a thread of the
    # coordinator's): the two no longer share one interpreter lock (BENCHMARKS.md §6).
    own_process: bool = True


@dataclass
class CoordinatorConfig:
    """The coordinator daemon."""

    db: str = ""  # empty = sqlite in the data directory
    data_dir: str = ""  # empty = $XCLOUD_HOME/data
    liveness_factor: float = 2.0  # lost after this many missed heartbeat intervals
    default_heartbeat_s: float = 5.0
    heartbeat_flush_s: float = 0.2  # batch window for heartbeat writes
    # Live reservations one principal may hold: a shell and a `xcloud run` at once.
    max_reservations_per_principal: int = 4
    default_lease_s: float = 30.0  # lease when a reserve names none
    max_lease_s: float = 3600.0  # longer requested leases are cut to this
    client_grace_s: float = 10.0  # client.gone -> reservations end unless client.hello
    # A worker's last will is a suspicion, not a verdict (docs/state-machines.md): it is
    # lost once silent this long after the will while our own connection stayed up...
    will_confirm_s: float = 1.0
    # ...and after our connection to the broker comes back, nothing ends (leases, client
    # grace periods, liveness deadlines) for this long: the others are reconnecting too.
    reconnect_grace_s: float = 15.0
    open_timeout_s: float = 10.0  # wait for the worker's answer to reservation.open
    # Per-principal token buckets (docs/security.md, "Rate limits"); rate 0 = no limit.
    rate_limit_per_s: float = 50.0  # requests that trigger work (reserve, lists, admin, ...)
    rate_limit_burst: int = 200
    report_rate_per_s: float = 200.0  # exec.report per worker
    report_burst: int = 2000
    # Data objects (docs/data.md). Quota: bytes of distinct objects a principal's names
    # hold plus its unfinished uploads; admins get data_admin_quota_bytes (0 = no limit).
    data_quota_bytes: int = 10 * 1024**3
    data_admin_quota_bytes: int = 0
    data_gc_s: float = 300.0  # garbage collection pass: expired names, unreferenced objects
    # A partial upload file no transfer record names (a crash between the two) is
    # deleted by the pass once this old; records themselves idle out in the engine.
    data_partial_grace_s: float = 3600.0


@dataclass
class WorkerConfig:
    """A worker agent."""

    name: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    slots: int = 1
    heartbeat_s: float = 5.0
    # The worker's own principal and token (a config file's [bus] ones are the client's,
    # never the worker's; worker/identity.py). `xcloud worker --id/--token` beat these.
    principal: str = ""
    token: str = field(default="", repr=False)
    state_dir: str = ""  # empty = $XCLOUD_HOME/worker
    executor: str = "process"
    shared_apps: list[str] = field(default_factory=list)
    shared_packages: list[str] = field(default_factory=list)
    shared_data: list[str] = field(default_factory=list)
    # Remote commands (worker/exec_service.py, docs/exec.md). exec.start values are capped
    # by these.
    exec_timeout_s: float = 0.0  # default (and maximum) run time of a command; 0 = none
    max_output_bytes: int = 256 * 1024 * 1024  # output of a command beyond this is dropped
    log_ring_bytes: int = 1024 * 1024  # output kept per command for exec.logs
    coord_pubkey: str = ""  # base64 Ed25519 key that signs grants; "" = from coord/pubkey
    coordinator_principal: str = "coordinator"  # the only sender of reservation.open/close
    # Per-principal token bucket for caps.refresh and exec.* (rate 0 = no limit).
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 500
    # The process executor's containment (worker/executors/cgroups.py, docs/exec.md):
    # auto | v2 | v1 | off (off = process groups, sessions and markers only).
    process_cgroups: str = "auto"
    # The docker executor (worker/executors/docker/, docs/docker.md).
    docker_image: str = "xcloud-base:bookworm"  # used when a reservation names none
    docker_network: bool = False  # may sessions ask for a network ("host")? owner's call
    docker_memory_bytes: int = 512 * 1024 * 1024  # per session container, no swap
    docker_cpus: float = 1.0
    docker_pids: int = 256
    docker_allow_image_override: bool = True  # honour the reservation's image
    docker_user: str = "1000:1000"  # "" = the worker's own uid:gid (1000:1000 if root)
    # Batch jobs (worker/job_runner.py, docs/jobs.md): the input cache and output caps.
    cache_dir: str = ""  # empty = <state_dir>/cache
    cache_bytes: int = 10 * 1024**3  # the input cache's size cap (LRU eviction beyond)
    job_output_bytes: int = 64 * 1024 * 1024  # stdout, and stderr, kept per attempt
    job_queue: int = 2  # attempts accepted beyond the slots, waiting for one (prefetch)
    # the ok to job.assign waits this long for the attempt's report to answer it instead
    # (worker/assign_answers.py; 0 = at once)
    job_ack_wait_s: float = 0.1


@dataclass
class ClientConfig:
    """The shell, the CLI verbs and the Python API."""

    history_file: str = ""  # empty = $XCLOUD_HOME/shell_history
    color: str = "auto"  # auto | always | never
    lease_s: float = 30.0  # reservation lease asked for; renewed every lease/3
    stall_s: float = 10.0  # output silence after which the client asks the worker for news
    coordinator_principal: str = "coordinator"  # the only sender of reservation.ended


@dataclass
class MonitoringConfig:
    """The coordinator's dashboard, ``/metrics`` and stored time series (docs/monitoring.md)."""

    http: bool = False  # serve the dashboard (xcloud up: on unless --no-http)
    http_host: str = "127.0.0.1"  # the dashboard's listener; never public by default
    http_port: int = 0  # 0 = a free port, printed at start
    metrics_public: bool = False  # serve /metrics without a token (for a local Prometheus)
    per_worker_metrics: bool = True  # per-worker gauges in /metrics (label: worker id)
    session_ttl_s: float = 12 * 3600.0  # dashboard login sessions
    live_tick_s: float = 1.0  # how often live updates go to open pages
    rollup_s: float = 10.0  # roll-up / retention pass, and the grid-wide sample period
    raw_retention_s: float = 3600.0  # heartbeat samples kept at full resolution
    # Downsampled tiers, finest first, "RESOLUTION:RETENTION" (s, m, h, d): each
    # resolution a multiple of the previous one.
    tiers: list[str] = field(default_factory=lambda: ["1m:1d", "15m:8d", "1h:35d"])


@dataclass
class JobsConfig:
    """Batch jobs at the coordinator (docs/jobs.md): the scheduler and its deadlines."""

    assign_ack_s: float = 10.0  # a job.assign not acknowledged (ok) this long: lease_expired
    lease_s: float = 300.0  # the attempt lease told to the worker in job.assign
    pass_s: float = 1.0  # the scheduler's periodic pass (also runs on every event)
    candidates_per_slot: int = 4  # queued jobs looked at per free slot in one pass
    assign_threads: int = 16  # unused since job.assign waits on no thread (older files set it)
    missed_heartbeats: int = 2  # heartbeats an attempt may be missing from before it is lost
    max_kills: int = 16  # job.kill per worker per kill_resend_s (reconciliation)
    kill_resend_s: float = 10.0  # one job.kill per unknown attempt per this interval
    prefetch: int = 0  # attempts a full worker may hold waiting for a slot (0 = none)
    steal_after_s: float = 1.0  # such an attempt moves to an idle worker after this
    unmatchable_hold_s: float = 600.0  # queued this long and no known worker fits: held (0: never)
    # job events coming faster than one send each: gathered this long, several per message
    event_flush_s: float = 0.02
    # Fair share (docs/jobs.md, "Fair share and locality"): principal -> weight (default 1);
    # TOML `shares = {alice = 2, bob = 1}` or a [jobs.shares] table; env "alice=2,bob=1".
    shares: dict[str, float] = field(default_factory=dict)
    fair_share: bool = True  # false: one queue in priority then submission order, as before


@dataclass
class Config:
    """All sections; components read the ones they need."""

    home: Path = field(default_factory=default_home)
    bus: BusConfig = field(default_factory=BusConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    #: Where each setting load_config set came from: "section.key" -> "file",
    #: "environment" or "flags" (a setting made in code has none). The worker reads it:
    #: the [bus] identity in a config file is the client's, never the worker's.
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def origin(self, section: str, key: str) -> str | None:
        """Which layer set ``section.key`` (None: a default, or set in code)."""
        return self.origins.get(f"{section}.{key}")

    @property
    def config_file(self) -> Path:
        return Path(os.environ.get("XCLOUD_CONFIG") or self.home / "config.toml")

    @property
    def data_dir(self) -> Path:
        return Path(self.coordinator.data_dir or self.home / "data").expanduser()

    @property
    def db_url(self) -> str:
        return self.coordinator.db or f"sqlite:///{self.data_dir / 'xcloud.db'}"

    @property
    def worker_state_dir(self) -> Path:
        return Path(self.worker.state_dir or self.home / "worker").expanduser()


SECTIONS = ("bus", "broker", "coordinator", "worker", "client", "monitoring", "jobs")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Coerce a TOML or environment value to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
        origin = typing.get_origin(hint)
    try:
        if origin is dict:  # {name: number}: a TOML table, or "a=2,b=1" from the environment
            return _number_table(value, where)
        if origin is list:
            if isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, list):
                items = [str(v) for v in value]
            else:
                raise TypeError("expected a list")
            return items
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool):
                raise TypeError("expected an integer")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected a whole number")
                return int(value)
            return int(str(value).strip())
        if hint is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError("expected a string")
            return str(value)
        if hint is Path:
            return Path(str(value)).expanduser()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad value for {where}: {value!r} ({err})") from err
    return value


def _number_table(value: Any, where: str) -> dict[str, float]:
    """A table of positive finite numbers by name (``[jobs] shares``)."""
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        for item in (v.strip() for v in value.split(",")):
            if item:
                name, sep, number = item.partition("=")
                if not sep:
                    raise ConfigError(f"bad value for {where}: {item!r} is not NAME=NUMBER")
                pairs.append((name.strip(), number.strip()))
        value = dict(pairs)
    if not isinstance(value, dict):
        raise ConfigError(f"bad value for {where}: {value!r} (expected a table)")
    table: dict[str, float] = {}
    for name, number in value.items():
        try:
            weight = float(number)
        except (TypeError, ValueError):
            weight = math.nan
        if isinstance(number, bool) or not math.isfinite(weight) or weight <= 0 or not name:
            raise ConfigError(f"bad value for {where}: {name} = {number!r} "
                              "(expected a positive number)")
        table[str(name)] = weight
    return table


def _apply(section_obj: Any, values: dict[str, Any], source: str, section: str,
           origins: dict[str, str] | None = None, layer: str = "") -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(f"{source}: unknown setting [{section}] {key}")
        setattr(section_obj, name, _convert(value, hints[name], f"{source} [{section}] {key}"))
        if origins is not None:
            origins[f"{section}.{name}"] = layer or source


def load_config(
    path: Path | None = None,
    *,
    env: typing.Mapping[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Build a Config from defaults, the TOML file, the environment and flag overrides.

    ``overrides`` maps section -> {key: value}; ``None`` values are ignored so that
    argparse flags left unset do not mask lower layers.
    """
    env = os.environ if env is None else env
    cfg = Config()
    if env.get("XCLOUD_HOME"):
        cfg.home = Path(env["XCLOUD_HOME"]).expanduser()
    file = path or Path(env.get("XCLOUD_CONFIG") or cfg.home / "config.toml")
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config file {file}: {err}") from err
        for section, values in data.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"{file}: unknown section [{section}]")
            _apply(getattr(cfg, section), values, str(file), section, cfg.origins, "file")
    for section in SECTIONS:
        obj = getattr(cfg, section)
        prefix = f"XCLOUD_{section.upper()}_"
        known = {f.name for f in dataclasses.fields(obj)}
        values = {
            k[len(prefix) :].lower(): v
            for k, v in env.items()
            if k.startswith(prefix) and k[len(prefix) :].lower() in known
        }
        _apply(obj, values, "environment", section, cfg.origins)
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        _apply(getattr(cfg, section), given, "flags", section, cfg.origins)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX for controls).
    # Non-ASCII stays raw UTF-8 (TOML rejects escaped surrogate pairs); DEL needs escaping.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write (replace) the given sections of a TOML config file, keeping other sections.

    Used by ``xcloud up`` to leave a client config behind; the file holds a token, so it
    is created with mode 0600.
    """
    existing: dict[str, Any] = {}
    if path.exists():
        existing = tomllib.loads(path.read_text())
    existing.update(sections)
    lines = ["# written by xcloud; edit freely", ""]
    for section, values in existing.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)
