"""SSH tunnels to engines on nodes this machine cannot reach directly (like dstack's `attach`).

The tunnel goes through the SSH config SkyPilot generates for the cluster, so it works
wherever `ssh <cluster>` does (clouds, Kubernetes, Slurm through SkyPilot's proxy).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from llm_atc.backends.local import pick_port
from llm_atc.errors import LaunchError, UserError
from llm_atc.readiness import READY_PATHS, probe
from llm_atc.registry import Record

OPEN_TIMEOUT = 60.0


class Tunnel:
    """A running ``ssh -N -L`` to one engine; ``endpoint`` is its local ``http://127.0.0.1:PORT``."""

    def __init__(self, process: subprocess.Popen, local_port: int, errors, scheme: str = "http"):
        self.process = process
        self.local_port = local_port
        self.scheme = scheme
        self._errors = errors

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.local_port}"

    @property
    def base_url(self) -> str:
        return self.endpoint + "/v1"

    def error(self) -> str:
        """ssh's last error line (after it exited)."""
        self._errors.seek(0)
        lines = [line.strip() for line in self._errors.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"ssh exited with code {self.process.returncode}"

    def wait(self) -> None:
        """Block while the tunnel is open; LaunchError when it closes by itself."""
        self.process.wait()
        raise LaunchError(f"the tunnel closed: {self.error()}")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._errors.close()


@contextmanager
def forward(record: Record, *, local_port: int | None = None, timeout: float = OPEN_TIMEOUT) -> Iterator[Tunnel]:
    """Forward 127.0.0.1:``local_port`` (default: a free port) to the engine on the cluster's
    head node, wait until the engine answers through it, and close it on exit."""
    from llm_atc.backends.skypilot import ssh_config

    if record.is_local:
        raise UserError(f"{record.name} runs on this machine already: {record.endpoint}")
    if shutil.which("ssh") is None:
        raise UserError("--forward needs the OpenSSH client (ssh): e.g. apt-get install openssh-client")
    config = ssh_config(record.cluster)
    port = pick_port(local_port or 0, option="--local_port")
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [
            "ssh",
            "-F",
            str(config),
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-L",
            f"127.0.0.1:{port}:127.0.0.1:{record.port or 8000}",
            record.cluster,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        start_new_session=True,
    )
    cafile = record.details.get("tls_cert")
    tunnel = Tunnel(process, port, errors, "https" if cafile else "http")
    try:
        _wait_open(tunnel, READY_PATHS.get(record.engine or "vllm", "/v1/models"), timeout, cafile)
        yield tunnel
    finally:
        tunnel.close()


def _wait_open(tunnel: Tunnel, path: str, timeout: float, cafile: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tunnel.process.poll() is not None:
            raise LaunchError(f"could not open the tunnel: {tunnel.error()}")
        status, _ = probe(tunnel.endpoint + path, timeout=5, cafile=cafile)
        if status and status < 500:
            return
        time.sleep(0.5)
    raise LaunchError(f"no answer from the engine through the tunnel within {timeout:.0f}s")
