"""The grant holder's requests about its commands: ``exec.signal``, ``exec.list`` and
``exec.logs`` (each under a grant, see worker/exec_auth.py)."""

from __future__ import annotations

import signal as _signal

from broker.bus import Bus, Incoming
from schemas.messages import (
    ExecList,
    ExecListReply,
    ExecLogs,
    ExecLogsReply,
    ExecSignal,
    Ok,
)
from schemas.topics import Topics
from worker.exec_auth import ExecAuthorizer
from worker.executors.base import Executor, ExecutorError
from worker.output import LogsView

SIGNALS = frozenset({"INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2"})


class ExecRequests:
    """Answers signal, list and logs requests about the commands of a session."""

    def __init__(self, bus: Bus, topics: Topics, executor: Executor,
                 authorizer: ExecAuthorizer) -> None:
        self.bus = bus
        self.topics = topics
        self.executor = executor
        self.authorizer = authorizer

    def on_signal(self, incoming: Incoming) -> None:
        body: ExecSignal = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        if body.signal not in SIGNALS:
            self.bus.reply_error(incoming, "invalid", f"unknown signal {body.signal}")
            return
        if ex.exit is not None:  # a Ctrl-C racing the exit is not an error
            self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "exited"}))
            return
        try:
            self.executor.signal(ex.handle, int(_signal.Signals[f"SIG{body.signal}"]))
        except ExecutorError as err:
            self.bus.reply_error(incoming, "internal", f"cannot signal {ex.exec_id}: {err}")
            return
        self.bus.reply(incoming, Ok(detail={"exec_id": ex.exec_id, "state": "running"}))

    def on_list(self, incoming: Incoming) -> None:
        body: ExecList = incoming.body
        auth = self.authorizer.authorize(incoming, body.grant)
        if auth is None:
            return
        session = auth[1]
        with session.lock:
            execs = [e.summary() for e in session.execs.values()]
        self.bus.reply(incoming, ExecListReply(execs=execs))

    def on_logs(self, incoming: Incoming) -> None:
        body: ExecLogs = incoming.body
        ex = self.authorizer.authorized_exec(incoming, body.grant, body.exec_id)
        if ex is None:
            return
        assert incoming.sender is not None
        follow = self.topics.client_inbox(incoming.sender) if body.follow else None
        # base64 grows data by 4/3; leave room for the envelope and the JSON around it.
        budget = max(64 * 1024, (self.bus.config.max_payload - 64 * 1024) * 3 // 4)

        def reply(view: LogsView) -> None:
            self.bus.reply(incoming, ExecLogsReply(
                exec_id=ex.exec_id, chunks=[c.to_wire() for c in view.chunks],
                state="exited" if view.exit is not None else "running",
                first_seq=view.first_seq,
                exit=view.exit.to_dict() if view.exit is not None else None,
                following=view.following,
            ))

        ex.streamer.logs(body.from_seq or 0, budget, follow, reply)
