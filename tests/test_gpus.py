"""GPU detection (worker/gpus.py, worker/gpu_sources.py) against output captured on an
H100 machine (tests/data/gpu/, a copy of the shared fixtures).

There is no GPU here, so the two sources are played by stand-ins that serve the captured
output: a fake ``nvidia-smi`` (a script on PATH that answers ``--query-gpu`` from the
captured CSV row, ``-q -x`` and ``-L`` from the captured files) and a fake ``pynvml``
module answering from the captured nvml.json. What is tested is the parsing, the
mapping into bounded records, the fallbacks, and that a hung or failing driver gives
"no GPUs" in bounded time without raising.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from schemas.codec import decode, encode, envelope
from tests.fixtures.actors import minimal_caps, minimal_heartbeat
from tests.fixtures.leaks import ThreadGuard
from tests.fixtures.services import wait_for
from worker import gpus
from worker.gpu_sources import (
    INVENTORY_FIELDS,
    MAX_GPUS,
    MAX_NAME,
    MIB,
    GpuInfo,
    GpuUsage,
    inventory_from_rows,
    parse_query_csv,
    usage_from_rows,
)
from worker.gpus import GpuProbe

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "gpu" / "h100-80gb"
GPU_CHECK = REPO / "scripts" / "gpu-check"

#: The fields of the captured nvidia-smi-query.csv, in order (tests/data/gpu/README.md).
CAPTURED_FIELDS = (
    "index", "uuid", "name", "memory.total", "memory.used", "memory.free", "driver_version",
    "compute_cap", "utilization.gpu", "utilization.memory", "temperature.gpu", "power.draw",
    "power.limit", "pci.bus_id", "mig.mode.current",
)

H100 = GpuInfo(
    index=0,
    vendor="nvidia",
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-592d4872-1c04-4b9f-9910-b853ee34dfc8",
    memory_bytes=81559 * MIB,
    driver="580.159.04",
    compute_capability="9.0",
)
#: nvidia-smi's sample: 0 %, 0 MiB used, 35 °C.
H100_IDLE_SMI = GpuUsage(index=0, util_percent=0, memory_used_bytes=0, temperature_c=35)
#: NVML's sample: its "used" counts the driver's reserved 480 MiB; no temperature captured.
H100_IDLE_NVML = GpuUsage(index=0, util_percent=0, memory_used_bytes=503316480,
                          temperature_c=None)


# ------------------------------------------------------------------------ stand-ins

FAKE_NVIDIA_SMI = '''#!{python}
"""A stand-in for nvidia-smi serving the captured H100 output; behaviour from
config.json beside it, read at every call."""
import json, pathlib, sys, time

here = pathlib.Path(__file__).resolve().parent
cfg = json.loads((here / "config.json").read_text())
with open(here / "calls.log", "a") as fh:
    fh.write(" ".join(sys.argv[1:]) + "\\n")
while (here / "hold").exists():  # the test holds this call until it removes the file
    time.sleep(0.01)
if cfg.get("hang"):
    time.sleep(60)
if cfg.get("no_devices"):
    print("No devices were found")
    sys.exit(6)
if cfg.get("fail"):
    print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    sys.exit(9)
fixtures = pathlib.Path(cfg["fixtures"])
args = sys.argv[1:]
if args[:2] == ["-q", "-x"]:
    sys.stdout.write((fixtures / "nvidia-smi-q.xml").read_text())
    sys.exit(0)
if args == ["-L"]:
    sys.stdout.write((fixtures / "nvidia-smi-L.txt").read_text())
    sys.exit(0)
fields = next(a for a in args if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
captured = cfg["captured_fields"]
for field in fields:
    if field not in captured or field in cfg.get("reject", []):
        print('Field "%s" is not a valid field to query.' % field)
        sys.exit(2)
line = (fixtures / "nvidia-smi-query.csv").read_text().strip()
row = dict(zip(captured, [value.strip() for value in line.split(",")]))
row.update(cfg.get("override", {{}}))
for index in range(cfg.get("gpus", 1)):
    values = dict(row, index=str(index)) if index else row
    print(", ".join(values[field] for field in fields))
'''

FAKE_PYNVML = '''"""A stand-in for nvidia-ml-py's pynvml answering from the captured nvml.json."""
import json
import threading

_DATA = json.load(open({nvml_json!r}))

NVML_TEMPERATURE_GPU = 0
INIT_ERROR = None      # set by a test: nvmlInit raises NVMLError(INIT_ERROR)
INIT_BLOCK = None      # set by a test: a threading.Event nvmlInit waits for (a hung driver)
AS_BYTES = False       # older bindings return bytes
init_calls = 0
initialised = 0


class NVMLError(Exception):
    pass


def _check():
    if initialised <= 0:
        raise NVMLError("Uninitialized")


def _s(text):
    return text.encode() if AS_BYTES else text


def nvmlInit():
    global init_calls, initialised
    init_calls += 1
    if INIT_BLOCK is not None:
        INIT_BLOCK.wait()
    if INIT_ERROR:
        raise NVMLError(INIT_ERROR)
    initialised += 1


def nvmlShutdown():
    global initialised
    _check()
    initialised -= 1


def nvmlSystemGetDriverVersion():
    _check()
    return _s(_DATA["driver"])


def nvmlDeviceGetCount():
    _check()
    return _DATA["count"]


def nvmlDeviceGetHandleByIndex(index):
    _check()
    if not 0 <= index < len(_DATA["gpus"]):
        raise NVMLError("Invalid Argument")
    return _DATA["gpus"][index]


def nvmlDeviceGetName(handle):
    _check()
    return _s(handle["name"])


def nvmlDeviceGetUUID(handle):
    _check()
    return _s(handle["uuid"])


class _Memory:
    def __init__(self, total, used):
        self.total, self.used, self.free = total, used, total - used


def nvmlDeviceGetMemoryInfo(handle):
    _check()
    return _Memory(handle["memory_total"], handle["memory_used"])


def nvmlDeviceGetCudaComputeCapability(handle):
    _check()
    return tuple(handle["cc"])


class _Rates:
    def __init__(self, gpu, memory):
        self.gpu, self.memory = gpu, memory


def nvmlDeviceGetUtilizationRates(handle):
    _check()
    return _Rates(handle["util_gpu"], handle["util_mem"])


def nvmlDeviceGetTemperature(handle, sensor):
    _check()
    raise NVMLError("Not Supported")  # the capture has no temperature
'''


@dataclass
class FakeSmi:
    """The fake nvidia-smi in its own bin directory (first on PATH)."""

    bin_dir: Path

    def configure(self, **cfg: Any) -> None:
        cfg.setdefault("fixtures", str(FIXTURES))
        cfg.setdefault("captured_fields", list(CAPTURED_FIELDS))
        (self.bin_dir / "config.json").write_text(json.dumps(cfg))

    def calls(self) -> list[str]:
        log = self.bin_dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def hold(self, held: bool = True) -> None:
        path = self.bin_dir / "hold"
        if held:
            path.touch()
        else:
            path.unlink(missing_ok=True)


def write_fake_pynvml(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pynvml.py"
    path.write_text(FAKE_PYNVML.format(nvml_json=str(FIXTURES / "nvml.json")))
    return path


def bin_path(bin_dir: Path) -> str:
    """PATH with ``bin_dir`` first and the system's basics (sh, sleep) after it."""
    return os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])


@pytest.fixture
def no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import pynvml`` fail, as where nvidia-ml-py is not installed."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def no_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with no nvidia-smi on it."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSmi]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", bin_path(bin_dir))
    fake = FakeSmi(bin_dir)
    fake.configure()
    yield fake
    fake.hold(False)


@pytest.fixture
def fake_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake pynvml, imported under its real name (``import pynvml`` finds it)."""
    path = write_fake_pynvml(tmp_path / "pylib")
    spec = importlib.util.spec_from_file_location("pynvml", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


@pytest.fixture
def probes(
    no_leaked_threads: ThreadGuard,  # noqa: ARG001 - a guard, checked after the close
) -> Iterator[list[GpuProbe]]:
    """Probes a test makes; closed after it, then no thread of theirs may be left."""
    made: list[GpuProbe] = []
    yield made
    for probe in made:
        probe.close()


def own_children(marker: str) -> list[str]:
    """Command lines of this process's live descendants containing ``marker``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                cmdline = " ".join(child.cmdline())
                if marker in cmdline:
                    found.append(cmdline)
        except psutil.Error:
            continue
    return found


def sleepers(pause: str) -> list[int]:
    """Processes anywhere running ``sleep <pause>``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.info["cmdline"] and \
                proc.info["cmdline"][-1] == pause:
            found.append(proc.pid)
    return found


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("worker.gpu") and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ parsing the captures


def test_captured_query_csv_maps_to_caps_and_usage() -> None:
    rows = parse_query_csv((FIXTURES / "nvidia-smi-query.csv").read_text(), CAPTURED_FIELDS)
    assert len(rows) == 1
    assert rows[0]["mig.mode.current"] == "Disabled"
    assert inventory_from_rows(rows) == [H100]
    assert usage_from_rows(rows) == [H100_IDLE_SMI]
    assert H100.to_wire() == {
        "index": 0, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-592d4872-1c04-4b9f-9910-b853ee34dfc8", "memory_bytes": 85520809984,
        "driver": "580.159.04", "compute_capability": "9.0",
    }


def test_captured_csv_with_header_and_units_gives_the_same_gpu() -> None:
    """``--format=csv`` (header, "81559 MiB"): the header names the fields, units go."""
    rows = parse_query_csv((FIXTURES / "nvidia-smi-query-header.csv").read_text())
    assert list(rows[0]) == list(INVENTORY_FIELDS)
    assert rows[0]["memory.total"] == "81559 MiB"
    assert inventory_from_rows(rows) == [H100]


@pytest.mark.usefixtures("fake_pynvml", "fake_smi")
def test_nvml_and_nvidia_smi_agree_on_the_captured_gpu(probes: list[GpuProbe]) -> None:
    """The same H100 through NVML (bytes, (9, 0)) and nvidia-smi (MiB, "9.0")."""
    nvml = GpuProbe()
    smi = GpuProbe(use_nvml=False)
    probes += [nvml, smi]
    assert nvml.detect() == smi.detect() == [H100]
    assert (nvml.source, smi.source) == ("nvml", "nvidia-smi")


@pytest.mark.usefixtures("no_smi")
def test_nvml_detection_and_sampling_from_the_capture(fake_pynvml: Any,
                                                      probes: list[GpuProbe]) -> None:
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.source == "nvml"
    usage = probe.usage()
    assert usage == [H100_IDLE_NVML]
    assert usage[0].to_wire() == {"index": 0, "util_percent": 0,
                                  "memory_used_bytes": 503316480}  # no temperature
    assert fake_pynvml.init_calls == 1  # NVML stays initialised between samples
    probe.close()
    assert fake_pynvml.initialised == 0


@pytest.mark.usefixtures("no_smi")
def test_old_bindings_returning_bytes(fake_pynvml: Any, probes: list[GpuProbe]) -> None:
    fake_pynvml.AS_BYTES = True
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == [H100]


# ---------------------------------------------------------------------- bounds


def test_bounds_on_what_a_driver_says() -> None:
    fields = ("index", "uuid", "name", "memory.total", "driver_version", "compute_cap")
    rows = [
        f"3, GPU-{'a' * 70}, {'N' * 300}, [N/A], 580.1\x07, [Not Supported]",
        "1, GPU-1, Tesla T4, 15360, 535.104.05, 7.5",
        "1, GPU-dup, duplicate index, 1, 1, 1.0",
        "x, GPU-2, not an index, 1, 1, 1.0",
        "-1, GPU-3, negative index, 1, 1, 1.0",
        "٣, GPU-4, not an ascii digit, 1, 1, 1.0",
        "2, GPU-5, short row",
        "4, GPU-6, weird values, -5, N/A, nine",
    ]
    found = inventory_from_rows(parse_query_csv("\n".join(rows), fields))
    assert [g.index for g in found] == [1, 3, 4]
    t4, long, weird = found
    assert t4 == GpuInfo(1, "nvidia", "Tesla T4", "GPU-1", 15360 * MIB, "535.104.05", "7.5")
    assert long.name == "N" * MAX_NAME
    assert long.uuid is None  # too long for the schema: left out, never cut
    assert long.memory_bytes is None
    assert long.compute_capability is None
    assert long.driver == "580.1"  # control characters dropped
    assert long.to_wire() == {"index": 3, "vendor": "nvidia", "name": "N" * MAX_NAME,
                              "driver": "580.1"}
    assert (weird.memory_bytes, weird.driver, weird.compute_capability) == (None, None, None)


def test_usage_bounds() -> None:
    """worker.heartbeat requires utilisation and memory in use: a GPU whose driver will
    not say (or says nonsense) is left out of the sample; temperature is optional."""
    text = ("0, 150, 10, 40\n1, 99, [N/A], 40\n2, [N/A], 10, 40\n"
            "3, 5 %, 1024 MiB, 41 C\n4, 7, 0, [N/A]")
    assert usage_from_rows(parse_query_csv(text, gpus.USAGE_FIELDS)) == [
        GpuUsage(3, 5, 1024 * MIB, 41),
        GpuUsage(4, 7, 0, None),
    ]


def test_records_fit_the_wire_schemas() -> None:
    """What the probe produces is what worker.caps and worker.heartbeat accept."""
    rows = parse_query_csv((FIXTURES / "nvidia-smi-query.csv").read_text(), CAPTURED_FIELDS)
    odd = GpuInfo(15, "nvidia", None, None, None, None, None)
    caps = minimal_caps("w1", gpus=[g.to_wire() for g in [*inventory_from_rows(rows), odd]])
    beat = minimal_heartbeat("w1", 1, gpus=[u.to_wire() for u in usage_from_rows(rows)]
                             + [H100_IDLE_NVML.to_wire()])
    for body in (caps, beat):
        assert decode(encode(envelope(body))).body == body


@pytest.mark.usefixtures("no_pynvml")
def test_at_most_sixteen_gpus(fake_smi: FakeSmi, probes: list[GpuProbe]) -> None:
    fake_smi.configure(gpus=20)
    probe = GpuProbe()
    probes.append(probe)
    found = probe.detect()
    assert [g.index for g in found] == list(range(MAX_GPUS))
    assert len(probe.usage()) == MAX_GPUS


# ---------------------------------------------------------------- nvidia-smi fallback


@pytest.mark.usefixtures("no_pynvml")
def test_nvidia_smi_when_nvml_is_not_installed(
    fake_smi: FakeSmi, probes: list[GpuProbe], caplog: pytest.LogCaptureFixture,
) -> None:
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.source == "nvidia-smi"
    assert probe.usage() == [H100_IDLE_SMI]
    assert fake_smi.calls() == [
        "--query-gpu=index,uuid,name,memory.total,driver_version,compute_cap "
        "--format=csv,noheader,nounits",
        "--query-gpu=index,utilization.gpu,memory.used,temperature.gpu "
        "--format=csv,noheader,nounits",
    ]
    assert warnings(caplog) == []


@pytest.mark.usefixtures("fake_smi")
def test_nvidia_smi_when_nvml_has_no_driver(
    fake_pynvml: Any, probes: list[GpuProbe], caplog: pytest.LogCaptureFixture,
) -> None:
    fake_pynvml.INIT_ERROR = "Driver Not Loaded"
    caplog.set_level(logging.INFO, logger="worker.gpus")
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.source == "nvidia-smi"
    assert any("NVML: Driver Not Loaded; using nvidia-smi" in r.getMessage()
               for r in caplog.records)


@pytest.mark.usefixtures("fake_smi")
def test_nvidia_smi_when_pynvml_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probes: list[GpuProbe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pynvml.py").write_text("raise RuntimeError('half-installed bindings')\n")
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.syspath_prepend(str(broken))
    caplog.set_level(logging.INFO, logger="worker.gpus")
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.source == "nvidia-smi"
    assert any("the pynvml module does not import: half-installed bindings; using "
               "nvidia-smi" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("no_pynvml")
def test_old_driver_without_compute_cap(fake_smi: FakeSmi, probes: list[GpuProbe]) -> None:
    """Drivers before compute_cap existed reject the whole query: ask again without it."""
    fake_smi.configure(reject=["compute_cap"])
    probe = GpuProbe()
    probes.append(probe)
    [gpu] = probe.detect()
    assert gpu.compute_capability is None
    assert gpu.uuid == H100.uuid
    assert len(fake_smi.calls()) == 2


# ------------------------------------------------------------------------ no GPUs


@pytest.mark.usefixtures("no_smi", "no_pynvml", "no_leaked_threads")
def test_no_nvidia_smi_and_no_pynvml_means_no_gpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(gpus, "_shared_probe", None)  # a fresh process-wide probe
    assert gpus.detect_gpus() == []
    assert gpus.sample_gpus() == []
    assert gpus.shared_probe().source is None
    assert warnings(caplog) == []  # no driver is the normal case, not a problem
    assert gpus.shared_probe() is gpus.shared_probe()


@pytest.mark.usefixtures("no_pynvml")
def test_nvidia_smi_without_devices(fake_smi: FakeSmi, probes: list[GpuProbe],
                                    caplog: pytest.LogCaptureFixture) -> None:
    fake_smi.configure(no_devices=True)
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == []
    assert probe.source is None
    assert probe.usage() == []
    assert len(fake_smi.calls()) == 1  # nothing to sample
    assert warnings(caplog) == []


@pytest.mark.usefixtures("no_smi", "no_leaked_threads")
def test_nvml_installed_without_a_driver_means_no_gpus_quietly(
    fake_pynvml: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """nvidia-ml-py on a machine without NVIDIA's driver: NVML_ERROR_LIBRARY_NOT_FOUND."""
    fake_pynvml.INIT_ERROR = "NVML Shared Library Not Found"
    probe = GpuProbe()
    assert probe.detect() == []
    assert probe.source is None
    assert warnings(caplog) == []
    fake_pynvml.INIT_ERROR = "Driver Not Loaded"  # a driver that is there but broken
    assert probe.detect() == []
    [line] = warnings(caplog)
    assert line == "GPU detection: NVML: Driver Not Loaded; reporting no GPUs"
    probe.close()


@pytest.mark.usefixtures("no_pynvml")
def test_failing_nvidia_smi_means_no_gpus_and_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    probes: list[GpuProbe],
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't "
                      "communicate with the NVIDIA driver.\"\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", bin_path(bin_dir))
    probe = GpuProbe()
    probes.append(probe)
    assert probe.detect() == []
    assert probe.detect() == []  # again (a reconnect): no second warning
    assert probe.usage() == []
    [line] = warnings(caplog)
    assert "nvidia-smi exited with 1: NVIDIA-SMI has failed" in line
    assert "reporting no GPUs" in line


@pytest.mark.usefixtures("no_pynvml")
def test_hung_nvidia_smi_means_no_gpus_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    probes: list[GpuProbe],
) -> None:
    """A shell script whose child sleeps: both are killed at the timeout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    pause = f"61.{os.getpid()}{threading.get_ident() % 1000}"  # a unique command line
    script.write_text(f"#!/bin/sh\n/bin/sleep {pause}\necho 0, GPU-x, late, 1, 1, 1.0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", bin_path(bin_dir))
    probe = GpuProbe(timeout_s=0.5)
    probes.append(probe)
    started = time.monotonic()
    assert probe.detect() == []
    assert time.monotonic() - started < 30  # long before the script would have answered
    [line] = warnings(caplog)
    assert "nvidia-smi did not answer within 0.5 s" in line
    # The sleeping child too (orphaned, it would no longer be ours: look everywhere).
    wait_for(lambda: not sleepers(pause), timeout=5, message="the child was killed")


@pytest.mark.usefixtures("no_smi")
def test_hung_nvml_means_no_gpus_and_no_second_query(
    fake_pynvml: Any, probes: list[GpuProbe], caplog: pytest.LogCaptureFixture,
) -> None:
    """A call stuck in the driver cannot be killed: the caller gets [] at the deadline,
    later callers at once, and no second query piles up behind the first."""
    release = threading.Event()
    fake_pynvml.INIT_BLOCK = release
    probe = GpuProbe(timeout_s=0.2, grace_s=0.1)
    probes.append(probe)
    try:
        assert probe.detect() == []
        assert probe.detect() == []
        assert fake_pynvml.init_calls == 1
        [line] = warnings(caplog)
        assert "GPU detection did not finish within 0.2 s" in line
    finally:
        release.set()
    wait_for(lambda: fake_pynvml.initialised == 1, message="the hung init returned")
    wait_for(lambda: probe.detect() == [H100], message="detection after the driver recovered")


def _frames(thread: threading.Thread) -> set[str]:
    frame = sys._current_frames().get(thread.ident or -1)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


@pytest.mark.usefixtures("no_smi")
def test_concurrent_callers_share_one_detection(fake_pynvml: Any,
                                                probes: list[GpuProbe]) -> None:
    """caps.refresh and a reconnect may collect caps at once: the second caller waits
    for the detection in flight instead of calling it hung."""
    release = threading.Event()
    fake_pynvml.INIT_BLOCK = release
    probe = GpuProbe(timeout_s=30)
    probes.append(probe)
    results: dict[str, list[GpuInfo]] = {}
    first = threading.Thread(target=lambda: results.setdefault("first", probe.detect()))
    second = threading.Thread(target=lambda: results.setdefault("second", probe.detect()))
    try:
        first.start()
        wait_for(lambda: fake_pynvml.init_calls == 1, message="first detection started")
        second.start()
        wait_for(lambda: {"_detect", "join"} <= _frames(second),
                 message="second caller waiting")
    finally:
        release.set()
    first.join(10)
    second.join(10)
    assert results == {"first": [H100], "second": [H100]}
    assert fake_pynvml.init_calls == 1


# ------------------------------------------------------------------------ sampling


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.usefixtures("no_pynvml")
def test_late_sample_reuses_the_last_one(fake_smi: FakeSmi, probes: list[GpuProbe]) -> None:
    clock = Clock()
    probe = GpuProbe(timeout_s=30, sample_wait_s=10, stale_after_s=60, clock=clock)
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.usage() == [H100_IDLE_SMI]

    fake_smi.configure(override={"utilization.gpu": "55"})
    fake_smi.hold()  # the next nvidia-smi call is late
    assert probe.usage(wait_s=0.05) == [H100_IDLE_SMI]  # reused
    assert probe.usage(wait_s=0.05) == [H100_IDLE_SMI]  # still late: reused again
    wait_for(lambda: len(fake_smi.calls()) == 3, message="the late sample started")
    assert len(fake_smi.calls()) == 3  # no second sample while one is in flight

    fake_smi.hold(False)  # the late sample arrives
    busy = GpuUsage(0, 55, 0, 35)
    assert probe.usage() == [busy]
    assert len(fake_smi.calls()) == 3

    fake_smi.hold()
    clock.now += 61  # the last sample is now too old to report as current
    assert probe.usage(wait_s=0.05) == []
    fake_smi.hold(False)
    assert probe.usage() == [busy]


@pytest.mark.usefixtures("no_pynvml")
def test_hung_sample_is_killed_and_the_last_one_reused(
    fake_smi: FakeSmi, probes: list[GpuProbe], caplog: pytest.LogCaptureFixture,
) -> None:
    probe = GpuProbe(timeout_s=0.5, sample_wait_s=10)
    probes.append(probe)
    assert probe.detect() == [H100]
    assert probe.usage() == [H100_IDLE_SMI]
    fake_smi.configure(hang=True)
    assert probe.usage() == [H100_IDLE_SMI]  # waited for the kill, then reused
    [line] = warnings(caplog)
    assert "GPU sample from nvidia-smi failed: nvidia-smi did not answer within 0.5 s" in line
    assert own_children(str(fake_smi.bin_dir)) == []


# ---------------------------------------------------------------- scripts/gpu-check


def run_gpu_check(pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """scripts/gpu-check with the test's PATH (the fake nvidia-smi first)."""
    env = dict(os.environ, XCLOUD_PYTHON=sys.executable)
    env["PYTHONPATH"] = str(pythonpath) if pythonpath else ""
    return subprocess.run(["bash", str(GPU_CHECK), "5"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


@pytest.mark.usefixtures("fake_smi")
def test_gpu_check_agrees_with_the_captured_machine(tmp_path: Path) -> None:
    """The device check itself, against the stand-ins (with the fake pynvml on its
    path), so the lead's one run on a lent GPU machine is not spent on a bug."""
    pylib = tmp_path / "pylib"
    write_fake_pynvml(pylib)
    done = run_gpu_check(pylib)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<attached_gpus>1</attached_gpus>" in done.stdout
    assert "== nvml: answered by nvml, 1 GPU(s)" in done.stdout
    assert "== nvidia-smi: answered by nvidia-smi, 1 GPU(s)" in done.stdout
    assert json.dumps(H100.to_wire(), sort_keys=True) in done.stdout
    assert done.stdout.rstrip().endswith("OK: detection agrees with nvidia-smi")


def test_gpu_check_fails_on_disagreement(fake_smi: FakeSmi) -> None:
    fake_smi.configure(gpus=2)  # the query lists two GPUs, -q -x has one
    done = run_gpu_check()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: nvidia-smi: 2 GPU(s) detected, nvidia-smi -q -x has 1" in done.stdout


def test_gpu_check_without_nvidia_smi(fake_smi: FakeSmi) -> None:
    fake_smi.configure(fail=True)
    done = run_gpu_check()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "FAIL: nvidia-smi: nvidia-smi exited with 9" in done.stdout
