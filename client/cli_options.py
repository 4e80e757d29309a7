"""Options shared by the ``xcloud`` subcommands that live outside client/cli.py."""

from __future__ import annotations

import argparse


def identity_options(p: argparse.ArgumentParser) -> None:
    """``--principal``/``--id`` and ``--token``, after the command (SUPPRESS: a value given
    before the command, or in the config, is kept)."""
    p.add_argument("--principal", "--id", dest="principal", default=argparse.SUPPRESS,
                   help="principal id to connect as")
    p.add_argument("--token", default=argparse.SUPPRESS,
                   help="the principal's token (prefer XCLOUD_BUS_TOKEN)")
