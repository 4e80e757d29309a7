"""What the numbers were measured on: CPU, memory, kernel, and the versions of Python,
Mosquitto, MariaDB and the libraries under test, as a dict and as the one line a report
names it by.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from typing import Any

import psutil

from bench.brokers import mosquitto_binary
from bench.databases import mariadb_connect


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def mariadb_version() -> str:
    try:
        conn = mariadb_connect()
    except Exception:
        return "unavailable"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
            return str(row[0]) if row else "?"
    finally:
        conn.close()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line([mosquitto_binary(), "-h"]).replace("mosquitto version ", ""),
        "mariadb": mariadb_version(),
        "amqtt": _version("amqtt"),
        "paho-mqtt": _version("paho-mqtt"),
        "peewee": _version("peewee"),
        "PyMySQL": _version("PyMySQL"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['date']}, {m['nproc']} × {m['cpu_model']} ({m['memory_gib']} GiB), "
            f"Linux {m['kernel']}, Python {m['python']}, Mosquitto {m['mosquitto']}, "
            f"amqtt {m['amqtt']}, paho-mqtt {m['paho-mqtt']}, MariaDB {m['mariadb']}")
