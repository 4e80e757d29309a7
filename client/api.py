"""The Python API: ``Grid`` connects with the same configuration as the CLI.

    with Grid.connect() as grid:
        for w in grid.workers(state=["online"]):
            print(w.name, w.cpus)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.bus import Bus, RemoteError
from broker.config import Config, load_config
from client.errors import ClientError, NotConfigured
from schemas.messages import (
    Ping,
    Pong,
    WorkersList,
    WorkersListReply,
    WorkersShow,
    WorkersShowReply,
)
from schemas.topics import Topics


@dataclass(frozen=True)
class WorkerInfo:
    """One row of the worker table."""

    id: str
    name: str
    state: str
    index: int = -1
    tags: list[str] = field(default_factory=list)
    cpus: int = 0
    memory_bytes: int = 0
    os: str = ""
    arch: str = ""
    slots: int = 0
    free_slots: int = 0
    last_seen: float | None = None
    description: str = ""
    executors: list[str] = field(default_factory=list)
    cpu_percent: float | None = None
    load1: float | None = None
    caps: dict[str, Any] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> WorkerInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


class Grid:
    """A client connection to one grid."""

    def __init__(self, config: Config, bus: Bus | None = None) -> None:
        if not config.bus.principal or not config.bus.token:
            raise NotConfigured(
                "no client credentials: run `xcloud up` on this machine (it writes "
                f"{config.config_file}), or set XCLOUD_BUS_URL, XCLOUD_BUS_PRINCIPAL and "
                "XCLOUD_BUS_TOKEN"
            )
        self.config = config
        self.topics = Topics(config.bus.root)
        self.principal = config.bus.principal
        self.bus = bus or Bus(config.bus, inbox=self.topics.client_inbox(self.principal))

    @classmethod
    def connect(cls, config: Config | None = None) -> Grid:
        grid = cls(config or load_config())
        grid.bus.start()
        return grid

    def close(self) -> None:
        self.bus.stop()

    def __enter__(self) -> Grid:
        if not self.bus.connected.is_set():
            self.bus.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    def _call(self, body: Any, timeout: float | None = None) -> Any:
        try:
            return self.bus.request(self.topics.coord_inbox, body, timeout=timeout).body
        except RemoteError as err:
            raise ClientError(f"{body.TYPE} refused: {err}") from err

    def ping(self, timeout: float | None = None) -> Pong:
        reply: Pong = self._call(Ping(), timeout)
        return reply

    def workers(self, *, state: list[str] | None = None, tags: list[str] | None = None,
                min_cpus: int | None = None, min_memory_bytes: int | None = None,
                name: str | None = None) -> list[WorkerInfo]:
        """The worker table, in the stable order that ``index`` refers to."""
        reply: WorkersListReply = self._call(WorkersList(
            state=state or None, tags=tags or None, min_cpus=min_cpus,
            min_memory_bytes=min_memory_bytes, name=name))
        return [WorkerInfo.from_wire(row) for row in reply.workers]

    def worker(self, worker: str) -> WorkerInfo:
        """One worker by id or name, with capabilities, latest metrics and recent events."""
        reply: WorkersShowReply = self._call(WorkersShow(worker=worker))
        return WorkerInfo.from_wire(reply.worker)
