"""Where GPU facts come from: NVML (``pynvml``) and ``nvidia-smi --query-gpu``, and the
bounded records both are turned into (``GpuInfo`` for worker.caps, ``GpuUsage`` for
worker.heartbeat).

Everything here may block (a hung driver) and raise; ``worker.gpus.GpuProbe`` runs it
off-thread with deadlines and turns failures into "no GPUs". Standard library only, on
purpose: ``scripts/gpu-check`` runs it with a bare ``python3`` on a GPU machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from worker.errors import WorkerError

log = logging.getLogger(__name__)

VENDOR_NVIDIA = "nvidia"
#: At most this many GPUs are reported (the lowest indexes); the schemas' maxItems.
MAX_GPUS = 16
MAX_VENDOR = 32
MAX_NAME = 128
MAX_UUID = 64
MAX_DRIVER = 32
MAX_COMPUTE_CAPABILITY = 16
#: Indexes beyond this are not GPUs we believe in.
MAX_INDEX = 1023

#: How long detection may take before it counts as "no GPUs" (nvidia-smi: ~0.02 s;
#: NVML init + query: ~0.11 s on an H100 machine).
DETECT_TIMEOUT_S = 5.0

#: The inventory query (the fixture's nvidia-smi-query-header.csv used the same fields).
INVENTORY_FIELDS: tuple[str, ...] = (
    "index", "uuid", "name", "memory.total", "driver_version", "compute_cap",
)
#: The per-heartbeat query.
USAGE_FIELDS: tuple[str, ...] = ("index", "utilization.gpu", "memory.used", "temperature.gpu")

MIB = 1024 * 1024
_MAX_OUTPUT = 64 * 1024  # bytes of nvidia-smi output we look at
_MAX_ROWS = 256
_REAP_S = 2.0  # after killing a timed-out nvidia-smi, how long to wait for it to go
_CC = re.compile(r"^\d{1,3}\.\d{1,3}$")
_UNIT = re.compile(r"\s*\[[^\]]*\]\s*$")  # " [MiB]" in a CSV header


class GpuUnavailable(WorkerError):
    """A GPU source did not answer (missing, failing, timed out); never leaves this module
    through the public functions, which turn it into "no GPUs" and a log line."""


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as worker.caps describes it; ``None`` where the driver would not say."""

    index: int
    vendor: str
    name: str | None
    uuid: str | None
    memory_bytes: int | None
    driver: str | None
    compute_capability: str | None  # "major.minor", e.g. "9.0"

    def to_wire(self) -> dict[str, Any]:
        """The worker.caps ``gpus`` item; unknown fields are left out (the schema makes
        all but ``index`` optional)."""
        return _without_none(self)


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's use at one moment, for worker.heartbeat (whose schema requires the
    utilisation and the memory in use; only the temperature may be unknown)."""

    index: int
    util_percent: int
    memory_used_bytes: int
    temperature_c: int | None

    def to_wire(self) -> dict[str, Any]:
        """The worker.heartbeat ``gpus`` item, an unknown temperature left out."""
        return _without_none(self)


def _without_none(record: GpuInfo | GpuUsage) -> dict[str, Any]:
    return {key: value for key, value in dataclasses.asdict(record).items()
            if value is not None}


# ----------------------------------------------------------------------- value helpers


def _text(value: Any, limit: int) -> str | None:
    """A printable, stripped string of at most ``limit`` characters (NVML may hand
    bytes), or None when empty or a "[N/A]"-style marker."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    text = "".join(ch for ch in str(value)[: limit * 4] if ch.isprintable()).strip()
    if not text or _is_marker(text):
        return None
    return text[:limit].rstrip()


def _is_marker(text: str) -> bool:
    """nvidia-smi's way of saying "no value": N/A, [N/A], [Not Supported], [GPU is lost]…"""
    return text.upper() == "N/A" or (text.startswith("[") and text.endswith("]"))


def _number(value: Any) -> float | None:
    """A finite, non-negative number from ``81559``, ``"81559 MiB"`` or ``"35 %"``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = _text(value, 64)
        if text is None:
            return None
        try:
            number = float(text.split()[0])
        except ValueError:
            return None
    if not math.isfinite(number) or number < 0:
        return None
    return number


def _int(value: Any, maximum: int) -> int | None:
    number = _number(value)
    if number is None or number > maximum:
        return None
    return int(number)


def _uuid(value: Any) -> str | None:
    """A uuid that fits the schema, whole: a cut uuid would name another device."""
    text = _text(value, MAX_UUID * 2)
    return text if text is not None and len(text) <= MAX_UUID and " " not in text else None


def _compute_capability(value: Any) -> str | None:
    """"9.0" from nvidia-smi's ``compute_cap`` or NVML's ``(9, 0)``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        major, minor = (_int(part, 999) for part in value)
        return None if major is None or minor is None else f"{major}.{minor}"
    text = _text(value, MAX_COMPUTE_CAPABILITY)
    return text if text is not None and _CC.match(text) else None


def _index(value: Any) -> int | None:
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 6:
            return None
        return int(text) if int(text) <= MAX_INDEX else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INDEX:
        return value
    return None


def make_gpu_info(
    index: Any,
    *,
    name: Any = None,
    uuid: Any = None,
    memory_bytes: Any = None,
    driver: Any = None,
    compute_capability: Any = None,
) -> GpuInfo | None:
    """A bounded ``GpuInfo`` from raw source values, or None without a usable index."""
    idx = _index(index)
    if idx is None:
        return None
    return GpuInfo(
        index=idx,
        vendor=VENDOR_NVIDIA[:MAX_VENDOR],
        name=_text(name, MAX_NAME),
        uuid=_uuid(uuid),
        memory_bytes=_int(memory_bytes, 2**62),
        driver=_text(driver, MAX_DRIVER),
        compute_capability=_compute_capability(compute_capability),
    )


def make_gpu_usage(
    index: Any, *, util_percent: Any = None, memory_used_bytes: Any = None,
    temperature_c: Any = None,
) -> GpuUsage | None:
    """A bounded ``GpuUsage`` from raw source values, or None without a usable index,
    utilisation or memory in use (a heartbeat item must have all three)."""
    idx = _index(index)
    util = _int(util_percent, 100)
    used = _int(memory_used_bytes, 2**62)
    if idx is None or util is None or used is None:
        return None
    return GpuUsage(index=idx, util_percent=util, memory_used_bytes=used,
                    temperature_c=_int(temperature_c, 200))


def _first_per_index(items: Iterable[Any]) -> list[Any]:
    """Sorted by index, duplicates dropped, at most MAX_GPUS."""
    seen: dict[int, Any] = {}
    for item in items:
        if item is not None and item.index not in seen:
            seen[item.index] = item
    return [seen[i] for i in sorted(seen)][:MAX_GPUS]


# ------------------------------------------------------------------------ nvidia-smi CSV


def parse_query_csv(text: str, fields: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu`` CSV as {field: raw value}.

    With ``fields`` the text is ``--format=csv,noheader[,nounits]`` output in that field
    order; without, its first line is the header (``--format=csv``: ``memory.total
    [MiB]`` becomes ``memory.total``, values keep their units, which ``_number``
    ignores). Rows with the wrong number of columns are skipped. nvidia-smi does not
    quote, and no field we ask for contains a comma.
    """
    lines = [line for line in text.splitlines() if line.strip()][:_MAX_ROWS + 1]
    if fields is None:
        if not lines:
            return []
        fields = [_UNIT.sub("", name).strip() for name in lines[0].split(",")]
        lines = lines[1:]
    rows: list[dict[str, str]] = []
    for line in lines[:_MAX_ROWS]:
        values = [value.strip() for value in line.split(",")]
        if len(values) != len(fields):
            log.debug("nvidia-smi row with %d columns, expected %d: %.200r",
                      len(values), len(fields), line)
            continue
        rows.append(dict(zip(fields, values)))
    return rows


def _mib(value: str | None) -> float | None:
    number = _number(value)
    return None if number is None else number * MIB


def inventory_from_rows(rows: Iterable[dict[str, str]]) -> list[GpuInfo]:
    """GPUs from parsed ``INVENTORY_FIELDS`` rows (memory in MiB, as nvidia-smi says)."""
    return _first_per_index(
        make_gpu_info(
            row.get("index"),
            name=row.get("name"),
            uuid=row.get("uuid"),
            memory_bytes=_mib(row.get("memory.total")),
            driver=row.get("driver_version"),
            compute_capability=row.get("compute_cap"),
        )
        for row in rows
    )


def usage_from_rows(rows: Iterable[dict[str, str]]) -> list[GpuUsage]:
    """Use samples from parsed ``USAGE_FIELDS`` rows."""
    return _first_per_index(
        make_gpu_usage(
            row.get("index"),
            util_percent=row.get("utilization.gpu"),
            memory_used_bytes=_mib(row.get("memory.used")),
            temperature_c=row.get("temperature.gpu"),
        )
        for row in rows
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()


def run_bounded(argv: Sequence[str], timeout_s: float) -> str:
    """stdout of ``argv``; GpuUnavailable when it cannot start, fails or overruns.

    It runs in a session of its own so that a timeout kills it and anything it started;
    a process stuck in the kernel (a hung driver) may survive even that, which is why
    callers also run this off-thread with a deadline.
    """
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as error:
        raise GpuUnavailable(f"cannot run {argv[0]}: {error.strerror or error}") from error
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=_REAP_S)
        raise GpuUnavailable(f"{os.path.basename(argv[0])} did not answer within "
                             f"{timeout_s:g} s") from None
    text = out[:_MAX_OUTPUT].decode("utf-8", "replace")
    if proc.returncode != 0:  # nvidia-smi says why on stdout, other tools on stderr
        said = text + "\n" + err[:_MAX_OUTPUT].decode("utf-8", "replace")
        first = next((line.strip() for line in said.splitlines() if line.strip()), "")
        raise GpuUnavailable(f"{os.path.basename(argv[0])} exited with {proc.returncode}"
                             + (f": {first[:200]}" if first else ""))
    return text


# ---------------------------------------------------------------------------- sources


class GpuSource(Protocol):
    """Where GPU facts come from; methods may block and raise (callers bound both)."""

    name: str

    def inventory(self) -> list[GpuInfo]: ...

    def usage(self) -> list[GpuUsage]: ...

    def close(self) -> None: ...


class NvidiaSmi:
    """``nvidia-smi --query-gpu`` as a source."""

    name = "nvidia-smi"

    def __init__(self, path: str, timeout_s: float = DETECT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def query(self, fields: Sequence[str]) -> list[dict[str, str]]:
        out = run_bounded([self.path, f"--query-gpu={','.join(fields)}",
                           "--format=csv,noheader,nounits"], self.timeout_s)
        return parse_query_csv(out, fields)

    def inventory(self) -> list[GpuInfo]:
        try:
            rows = self.query(INVENTORY_FIELDS)
        except GpuUnavailable as err:
            if "no devices were found" in str(err).lower():
                return []
            if "compute_cap" not in str(err):
                raise
            # Drivers before ~510 reject the whole query for a field they do not know.
            rows = self.query([f for f in INVENTORY_FIELDS if f != "compute_cap"])
        return inventory_from_rows(rows)

    def usage(self) -> list[GpuUsage]:
        return usage_from_rows(self.query(USAGE_FIELDS))

    def close(self) -> None:
        """Nothing is held between queries."""


class Nvml:
    """NVML through ``pynvml`` (package nvidia-ml-py). Initialised on first use and kept
    until ``close`` so heartbeat samples do not pay ``nvmlInit`` each time."""

    name = "nvml"

    def __init__(self, module: ModuleType) -> None:
        self.nvml = module
        self._initialised = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> Nvml | None:
        """The source, or None where the package is not installed (a broken install
        raises what its import raised)."""
        try:
            module = importlib.import_module("pynvml")
        except ImportError:
            return None
        return cls(module)

    def _init(self) -> None:
        with self._lock:
            if not self._initialised:
                self.nvml.nvmlInit()
                self._initialised = True

    @staticmethod
    def _try(call: Callable[..., Any], *args: Any) -> Any:
        """One field: a field this GPU does not support (NVMLError) is simply unknown."""
        try:
            return call(*args)
        except Exception as err:
            log.debug("NVML %s: %s", getattr(call, "__name__", "call"), err)
            return None

    def _handles(self) -> list[tuple[int, Any]]:
        self._init()
        count = int(self.nvml.nvmlDeviceGetCount())
        handles = [(i, self._try(self.nvml.nvmlDeviceGetHandleByIndex, i))
                   for i in range(min(max(count, 0), MAX_GPUS))]
        return [(i, h) for i, h in handles if h is not None]  # a lost GPU is left out

    def inventory(self) -> list[GpuInfo]:
        nvml, get = self.nvml, self._try
        handles = self._handles()
        driver = get(nvml.nvmlSystemGetDriverVersion)
        gpus = []
        for index, handle in handles:
            memory = get(nvml.nvmlDeviceGetMemoryInfo, handle)
            cc = get(nvml.nvmlDeviceGetCudaComputeCapability, handle)
            gpus.append(make_gpu_info(
                index, name=get(nvml.nvmlDeviceGetName, handle),
                uuid=get(nvml.nvmlDeviceGetUUID, handle),
                memory_bytes=getattr(memory, "total", None), driver=driver,
                compute_capability=tuple(cc) if isinstance(cc, (tuple, list)) else None))
        return _first_per_index(gpus)

    def usage(self) -> list[GpuUsage]:
        nvml, get = self.nvml, self._try
        sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        samples = []
        for index, handle in self._handles():
            rates = get(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = get(nvml.nvmlDeviceGetMemoryInfo, handle)
            samples.append(make_gpu_usage(
                index, util_percent=getattr(rates, "gpu", None),
                memory_used_bytes=getattr(memory, "used", None),
                temperature_c=get(nvml.nvmlDeviceGetTemperature, handle, sensor)))
        return _first_per_index(samples)

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                try:
                    self.nvml.nvmlShutdown()
                except Exception as err:
                    log.debug("nvmlShutdown: %s", err)
