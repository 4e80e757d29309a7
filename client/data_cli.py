"""``xcloud data``: put, get, ls, show, rm, pin, unpin, share (docs/data.md).

client/cli.py calls ``add_data_parser`` to build the subcommands; what runs them imports
the client API inside, so ``xcloud --help`` stays quick. Transfers draw a progress bar
(bytes, rate, ETA) on stderr when it is a terminal and stay quiet in a pipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from client.cli_options import identity_options

if TYPE_CHECKING:
    from broker.config import Config
    from client.data import DataRef

AddOptions = Callable[[argparse.ArgumentParser], None]
REDRAW_S = 0.2


def add_data_parser(sub: Any, common: AddOptions) -> None:
    """``xcloud data ...`` under the top-level subparsers ``sub``; ``common`` adds the
    options every command takes."""
    p = sub.add_parser("data", help="data objects on the coordinator: put, get, ls, show, "
                       "rm, pin, share", description="Content-addressed data objects kept "
                       "by the coordinator (docs/data.md). Name one by its name, its "
                       "SHA-256 or a unique prefix of at least 8 hex digits.")
    common(p)
    _identity(p)
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    def leaf(name: str, help: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = dsub.add_parser(name, help=help)
        common(q)
        _identity(q)
        return q

    q = leaf("put", "store files (progress on a terminal)")
    q.add_argument("files", nargs="+", metavar="FILE")
    q.add_argument("--name", help="name to store it under (one FILE only; default its "
                   "file name)")
    who = q.add_mutually_exclusive_group()
    who.add_argument("--public", action="store_true", help="anyone may read it")
    who.add_argument("--share", metavar="P,...", help="these principals may read it")
    q.add_argument("--expires", type=float, metavar="SECONDS",
                   help="the name may be collected after this long (unless pinned)")
    q.add_argument("--json", action="store_true", help="print the references as JSON")
    q.set_defaults(func=cmd_put)

    q = leaf("get", "fetch a data object into a file")
    q.add_argument("key", metavar="HASH|NAME")
    q.add_argument("-o", "--output", metavar="PATH",
                   help="file or directory to write (default: its name, here)")
    q.add_argument("--owner", help="whose name KEY is (data shared with you)")
    q.set_defaults(func=cmd_get)

    q = leaf("ls", "list your data objects")
    q.add_argument("--all", action="store_true", help="admins: everyone's")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_ls)

    q = leaf("show", "one data object in detail")
    q.add_argument("key", metavar="HASH|NAME")
    q.add_argument("--owner", help="whose name KEY is")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_show)

    for name, help, func in (("rm", "remove a name (the bytes go once nothing uses them)",
                              cmd_rm),
                             ("pin", "keep an object whatever its expiry", cmd_pin),
                             ("unpin", "undo pin", cmd_unpin)):
        q = leaf(name, help)
        q.add_argument("key", metavar="HASH|NAME")
        q.add_argument("--owner", help="admins: whose name KEY is")
        q.set_defaults(func=func)

    q = leaf("share", "set who may read an object")
    q.add_argument("key", metavar="HASH|NAME")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--public", action="store_true", help="anyone may read it")
    how.add_argument("--with", dest="principals", metavar="P,...",
                     help="these principals may read it")
    how.add_argument("--private", action="store_true", help="only you (and admins)")
    q.add_argument("--owner", help="admins: whose name KEY is")
    q.set_defaults(func=cmd_share)


def _identity(p: argparse.ArgumentParser) -> None:
    """--principal/--token, before or after the data command (SUPPRESS keeps the first)."""
    identity_options(p)


# -- progress ----------------------------------------------------------------------------


class ProgressBar:
    """``name  42%  [#####.....]  12.0/28.5 MiB  31.2 MiB/s  ETA 0:01`` on a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label[-30:]
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started: float | None = None  # the first callback: hashing comes before
        self.base = 0
        self.last = 0.0
        self.drawn = False

    @staticmethod
    def wanted(stream: TextIO | None = None) -> bool:
        stream = stream or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:
            self.started, self.base, self.last = now, done, now
            if done < total:
                return
        if done < total and now - self.last < REDRAW_S:
            return
        self.last = now
        self.stream.write("\r" + self.line(done, total, now - self.started, self.base))
        self.stream.flush()
        self.drawn = True

    def line(self, done: int, total: int, elapsed: float, base: int = 0) -> str:
        frac = done / total if total else 1.0
        rate = (done - base) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 20)
        return (f"{self.label:<30} {frac * 100:3.0f}% [{bar:<20}] {_mib(done)}/{_mib(total)} "
                f"MiB  {rate / 2**20:6.1f} MiB/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


# -- commands ----------------------------------------------------------------------------


def cmd_put(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.errors import InvalidRequest

    if args.name and len(args.files) > 1:
        raise InvalidRequest("--name names one file: give one FILE with it")
    share = _split(args.share)
    access = "public" if args.public else "shared" if share else "private"
    refs: list[DataRef] = []
    with Grid.connect(config) as grid:
        for path in args.files:
            bar = ProgressBar(args.name or Path(path).name) if ProgressBar.wanted() else None
            try:
                ref = grid.data.put(path, name=args.name, access=access, share=share or None,
                                    expires_s=args.expires, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
            refs.append(ref)
            if not args.json:
                print(f"{ref.sha256}  {ref.size:>12}  {ref.name}")
    if args.json:
        print(json.dumps([r.to_dict() for r in refs], indent=2))
    return 0


def cmd_get(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        bar = ProgressBar(args.key) if ProgressBar.wanted() else None
        try:
            dest = grid.data.get(args.key, args.output, owner=args.owner, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    print(dest)
    return 0


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid
    from client.table import ago, human_bytes

    with Grid.connect(config) as grid:
        refs = grid.data.ls(all=args.all)
    if args.json:
        print(json.dumps([r.to_dict() for r in refs], indent=2))
        return 0
    if not refs:
        print("no data (store some with `xcloud data put FILE`)")
        return 0
    rows = [("HASH", "SIZE", "ACCESS", "USED", "OWNER", "NAME")]
    for r in refs:
        access = r.access + ("*" if r.pinned else "")
        rows.append((r.sha256[:12], human_bytes(r.size) if r.size else "0B", access,
                     ago(r.last_used_at), r.owner, r.name))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        ref = grid.data.show(args.key, owner=args.owner)
    if args.json:
        print(json.dumps(ref.to_dict(), indent=2))
        return 0
    info = ref.to_dict()
    for key in ("name", "owner", "sha256", "size", "access", "share", "pinned",
                "created_at", "last_used_at", "expires_at", "id"):
        value = info.get(key)
        if key.endswith("_at") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        if value not in (None, [], ""):
            print(f"{key + ':':<14}{value if not isinstance(value, list) else ', '.join(value)}")
    for ref_row in ref.refs:
        print(f"{'kept by:':<14}{ref_row.get('kind')} {ref_row.get('ref')}")
    return 0


def cmd_rm(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        removed = grid.data.rm(args.key, owner=args.owner)
    print(f"removed {removed} name(s)")
    return 0


def cmd_pin(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        grid.data.pin(args.key, owner=args.owner)
    return 0


def cmd_unpin(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        grid.data.unpin(args.key, owner=args.owner)
    return 0


def cmd_share(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    with Grid.connect(config) as grid:
        grid.data.share(args.key, _split(args.principals), public=args.public,
                        owner=args.owner)
    return 0
