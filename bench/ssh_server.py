"""A private sshd on a free port and a ControlMaster connection to it, as root: the ``ssh``
that xcloud's exec, stdin, terminal and transfer benchmarks are set beside.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psutil

from bench.processes import (
    LOCALHOST,
    die_with_parent,
    free_port,
    port_open,
    run_quiet,
    stop_process,
    tail,
)


class SshServer:
    """A private sshd on a free port and a ControlMaster connection to it, as root."""

    def __init__(self, workdir: Path, mask_bashrc: bool = True) -> None:
        self.dir = workdir / f"ssh-{uuid.uuid4().hex[:6]}"
        self.mask_bashrc = mask_bashrc
        self.bashrc = "as is"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.control = self.dir / "cm.sock"
        self.master_pid: int | None = None

    def client_args(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                "-p", str(self.port), f"root@{LOCALHOST}"]

    def start(self, timeout: float = 15.0) -> SshServer:
        for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing (apt-get install -y openssh-server)")
        self.dir.mkdir(parents=True)
        host_key, user_key = self.dir / "host_ed25519", self.dir / "user_ed25519"
        for key in (host_key, user_key):
            run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        auth = self.dir / "authorized_keys"
        shutil.copy(user_key.with_suffix(".pub"), auth)
        auth.chmod(0o600)
        conf = self.dir / "sshd_config"
        conf.write_text("\n".join([
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {auth}",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PrintMotd no",
            f"PidFile {self.dir / 'sshd.pid'}",
            "LogLevel ERROR",
        ]) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        log_file = self.dir / "sshd.log"
        prefix = self._mask_prefix()
        for attempt in range(3):
            self.port = free_port()
            sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf), "-p", str(self.port),
                    "-o", f"ListenAddress={LOCALHOST}"]
            cmd = [*prefix[:-1], f"{prefix[-1]} {shlex.join(sshd)}"] if prefix else sshd
            with open(log_file, "ab") as logf:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if port_open(LOCALHOST, self.port):
                    break
                time.sleep(0.02)
            if self.proc.poll() is None and port_open(LOCALHOST, self.port):
                break
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"sshd did not start:\n{tail(log_file)}")
        subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(user_key), "-o", "IdentitiesOnly=yes",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
             "-o", "ControlMaster=yes", "-o", f"ControlPath={self.control}",
             "-o", "ControlPersist=yes", "-N", "-f", "-p", str(self.port),
             f"root@{LOCALHOST}"], check=True, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=30)
        check = subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                                "-O", "check", f"root@{LOCALHOST}"],
                               capture_output=True, text=True, timeout=10, check=False)
        text = check.stderr + check.stdout
        if "pid=" in text:
            self.master_pid = int(text.split("pid=")[1].split(")")[0])
        return self

    def _mask_prefix(self) -> list[str]:
        """``unshare`` + ``sh -c`` that hides root's ``~/.bashrc`` from this sshd only.

        bash sources ``~/.bashrc`` for commands run by sshd; root's here runs
        ``pyenv init`` (a quarter of a second), which is this machine's setup, not ssh's
        cost. A private mount namespace binds an empty file over it for sshd and its
        sessions alone; nothing outside sees a change.
        """
        bashrc = Path(os.path.expanduser("~root")) / ".bashrc"
        if not self.mask_bashrc or not bashrc.is_file() or shutil.which("unshare") is None:
            return []
        empty = self.dir / "empty_bashrc"
        empty.write_text("")
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(bashrc))}"],
            capture_output=True, timeout=10, check=False)
        if probe.returncode != 0:
            return []
        self.bashrc = "empty (masked)"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(bashrc))} && exec"]

    def cipher(self) -> str:
        """The cipher the master negotiated (from ``ssh -G``'s defaults: first offered)."""
        out = subprocess.run(["ssh", "-F", "/dev/null", "-G", f"root@{LOCALHOST}"],
                             capture_output=True, text=True, timeout=10, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("ciphers "):
                return line.split()[1].split(",")[0]
        return "?"

    def version(self) -> str:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10,
                             check=False)
        return (out.stderr or out.stdout).strip()

    def stop(self) -> None:
        if self.control.exists():
            subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                            "-O", "exit", f"root@{LOCALHOST}"], capture_output=True,
                           timeout=10, check=False)
        if self.master_pid is not None:
            with contextlib.suppress(psutil.Error):
                master = psutil.Process(self.master_pid)
                if master.name() == "ssh":
                    master.terminate()
                    master.wait(5)
            self.master_pid = None
        proc, self.proc = self.proc, None
        stop_process(proc, 10)

    def __enter__(self) -> SshServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
