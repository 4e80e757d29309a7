"""``xcloud admin ...`` and ``xcloud drain``: principals, drain, forget, Mosquitto export.

client/cli.py calls ``add_admin_parser``. The commands are requests to the running
coordinator as an admin principal (client/admin.py); with ``--db URL`` or ``--direct`` the
principal commands and mosquitto-export work on the coordinator's database itself
(coordinator/bootstrap.py), for bootstrap before any coordinator runs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.config import Config
from schemas.errors import XcloudError

if TYPE_CHECKING:
    from client.admin import PrincipalAdmin

AddOptions = Callable[..., None]


def add_admin_parser(sub: Any, _common: AddOptions, _bus_identity: AddOptions) -> None:
    """The ``admin`` command and its actions."""
    p = sub.add_parser(
        "admin", help="administration: principals, drain, Mosquitto export",
        description="Admin requests to the running coordinator, as an admin principal "
        "(`xcloud up` configures one). With --db URL (or --direct) the principal commands "
        "and mosquitto-export work on the coordinator's database itself instead: for "
        "bootstrap, before any coordinator runs.")
    _common(p)
    _bus_identity(p)
    db_help = ("work on this database directly (bootstrap, no coordinator needed): "
               "sqlite:///path.db or mysql://user:pass@host/db")
    direct_help = ("work directly on the configured database (coordinator.db, "
                   "XCLOUD_COORDINATOR_DB, else the SQLite in $XCLOUD_HOME/data)")
    p.add_argument("--db", help=db_help)
    p.add_argument("--direct", action="store_true", help=direct_help)
    # The same options after the action; SUPPRESS keeps a value given before it.
    leaf_direct = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    leaf_direct.add_argument("--db", help=db_help)
    leaf_direct.add_argument("--direct", action="store_true", help=direct_help)
    asub = p.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND")
    pp = asub.add_parser("principal", help="manage principals (users, workers, services)")
    psub = pp.add_subparsers(dest="principal_command", metavar="ACTION")
    a = psub.add_parser("add", parents=[leaf_direct],
                        help="create a principal and print its token once")
    a.add_argument("id", help="principal id (its MQTT user name)")
    a.add_argument("--role", default="client",
                   choices=["client", "worker", "admin", "coordinator"])
    a.add_argument("--note", default="", help="free text (at most 1024 characters)")
    a.add_argument("--rotate", action="store_true",
                   help="replace the token of an existing one (or create it)")
    a.set_defaults(func=cmd_principal_add)
    ro = psub.add_parser("rotate", parents=[leaf_direct],
                         help="give a principal a new token (printed once); the old one "
                         "stops working")
    ro.add_argument("id")
    ro.set_defaults(func=cmd_principal_rotate)
    ls = psub.add_parser("list", parents=[leaf_direct], help="list principals")
    ls.add_argument("--all", action="store_true", help="include revoked ones")
    ls.set_defaults(func=cmd_principal_list)
    rv = psub.add_parser("revoke", parents=[leaf_direct],
                         help="revoke a principal (its token stops working)")
    rv.add_argument("id")
    rv.set_defaults(func=cmd_principal_revoke)
    dr = asub.add_parser("drain", help="give a worker no new work (--undo: resume)")
    dr.add_argument("worker", help="worker id or name")
    dr.add_argument("--undo", action="store_true", help="resume giving it work")
    dr.set_defaults(func=cmd_drain)
    fg = asub.add_parser("forget", help="forget a lost or offline worker (it leaves the "
                         "listing; if it comes back it joins afresh)")
    fg.add_argument("worker", help="worker id, name or listing index")
    fg.set_defaults(func=cmd_forget)
    mx = asub.add_parser("mosquitto-export", parents=[leaf_direct],
                         help="write a Mosquitto password file and ACL file for our "
                         "principals (readable by the group mosquitto where it exists)")
    mx.add_argument("directory", type=Path)
    mx.set_defaults(func=cmd_mosquitto_export)



@contextlib.contextmanager
def _admin(args: argparse.Namespace, config: Config) -> Iterator[PrincipalAdmin]:
    """Over the bus as an admin, or on the database itself with --db / --direct."""
    if getattr(args, "db", None) or getattr(args, "direct", False):
        from coordinator.bootstrap import DirectAdmin

        with DirectAdmin.open(config.db_url, config.bus.root) as direct:
            yield direct
        return
    from client.admin import Admin
    from client.api import Grid
    from client.errors import NotConfigured

    try:
        grid = Grid.connect(config)
    except NotConfigured as err:
        raise NotConfigured(f"{err}; or, before any coordinator runs, give --db URL to work "
                            "on its database directly") from None
    with grid:
        yield Admin(grid)


def cmd_drain(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    if getattr(args, "db", None) or getattr(args, "direct", False):
        raise XcloudError("drain is a request to the running coordinator; --db and "
                          "--direct do not apply to it")

    target: str | int = int(args.worker) if args.worker.isdigit() else args.worker
    with Grid.connect(config) as grid:
        state = grid.drain(target, drain=not args.undo)
    print(f"worker {args.worker} is {state}")
    return 0


def cmd_forget(args: argparse.Namespace, config: Config) -> int:
    from client.api import Grid

    if getattr(args, "db", None) or getattr(args, "direct", False):
        raise XcloudError("forget is a request to the running coordinator; --db and "
                          "--direct do not apply to it")
    target: str | int = int(args.worker) if args.worker.isdigit() else args.worker
    with Grid.connect(config) as grid:
        wid = grid.forget_worker(target)
    print(f"worker {wid} forgotten")
    return 0


def cmd_principal_add(args: argparse.Namespace, config: Config) -> int:
    with _admin(args, config) as admin:
        token = admin.add_principal(args.id, args.role, args.note, replace=args.rotate)
    print(f"principal {args.id} ({args.role}) created. Its token, shown only once:")
    print(token)
    return 0


def cmd_principal_rotate(args: argparse.Namespace, config: Config) -> int:
    with _admin(args, config) as admin:
        token = admin.rotate(args.id)
    print(f"principal {args.id} has a new token (the old one no longer works), shown "
          "only once:")
    print(token)
    return 0


def cmd_principal_list(args: argparse.Namespace, config: Config) -> int:
    from client.admin import principals_table

    with _admin(args, config) as admin:
        rows = list(admin.principals(include_revoked=args.all))
    print(principals_table(rows))
    return 0


def cmd_principal_revoke(args: argparse.Namespace, config: Config) -> int:
    with _admin(args, config) as admin:
        admin.revoke(args.id)
    print(f"principal {args.id} revoked")
    return 0


def cmd_mosquitto_export(args: argparse.Namespace, config: Config) -> int:
    from client.admin import mosquitto_conf_hint, share_with_mosquitto

    with _admin(args, config) as admin:
        passwd, acl = admin.export_mosquitto(args.directory)
    note = share_with_mosquitto(passwd, acl)  # the --db path wrote them 0600 too
    print(mosquitto_conf_hint(passwd, acl))
    if note:
        print(note)
    return 0
