"""Databases for a fresh store: a SQLite file in a scratch directory, or a MariaDB
database (on the server ``XCLOUD_BENCH_MARIADB`` names) that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.processes import LOCALHOST

MARIADB_SERVER = os.environ.get("XCLOUD_BENCH_MARIADB", "mysql://root@127.0.0.1:3306")


def mariadb_connect(database: str | None = None) -> Any:
    import pymysql

    parts = urlsplit(MARIADB_SERVER)
    return pymysql.connect(host=parts.hostname or LOCALHOST, port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           database=database, connect_timeout=5, autocommit=True)


def mariadb_available() -> bool:
    try:
        mariadb_connect().close()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A database URL for a fresh store: a SQLite file, or a MariaDB database dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return
    if kind != "mariadb":
        raise ValueError(f"unknown database {kind!r}")
    name = f"xcloud_bench_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(MARIADB_SERVER)
    try:
        yield f"{parts.scheme}://{parts.netloc}/{name}"
    finally:
        with contextlib.suppress(Exception):
            conn = mariadb_connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            finally:
                conn.close()
