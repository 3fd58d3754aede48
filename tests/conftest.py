"""Shared fixtures: an isolated HOME, real object-store emulators, a tiny model, the CLI.

Every server started here binds 127.0.0.1 on a free port, is waited for with a
bounded loop, and is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# SkyPilot reads HOME and its server port when first imported, so the whole test
# session gets its own HOME and API server port before anything imports it.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="llm-atc-tests-home-"))
os.environ["HOME"] = str(_SESSION_HOME)
os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("LLM_ATC_HOME", None)
for _var in ("AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "AWS_PROFILE"):
    os.environ.pop(_var, None)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = str(free_port())


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Server:
    """A background process in its own process group, stopped on close."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(autouse=True)
def llm_atc_home(tmp_path, monkeypatch) -> Path:
    """Each test gets an empty ``$LLM_ATC_HOME``."""
    home = tmp_path / "llm_atc_home"
    monkeypatch.setenv("LLM_ATC_HOME", str(home))
    from llm_atc import ui

    ui.set_quiet(False)
    return home


@pytest.fixture(scope="session")
def tiny_model(session_dir) -> Path:
    """A tiny Llama-style chat model folder, built offline."""
    from tiny_model import build_tiny_model

    return build_tiny_model(session_dir / "tiny-model")


@pytest.fixture(scope="session")
def moto_endpoint(session_dir):
    port = free_port()
    server = Server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], session_dir / "moto.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", 60)
        yield url
    finally:
        server.close()


@pytest.fixture(scope="session")
def gcs_endpoint(session_dir):
    port = free_port()
    server = Server(
        [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        session_dir / "gcs.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, 60)
        yield url
    finally:
        server.close()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """boto3 pointed at moto; returns a client."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def gcs(gcs_endpoint, monkeypatch):
    """google-cloud-storage pointed at the emulator; returns a client."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="llm-atc-local", credentials=AnonymousCredentials())


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns() % 10**10}"


def upload_folder(folder: Path, put) -> None:
    """Upload every file of ``folder`` with ``put(relative_name, path)``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            put(str(path.relative_to(folder)), path)


@pytest.fixture
def s3_checkpoint(s3, tiny_model):
    """The tiny model uploaded to ``s3://<bucket>/llm-atc/tiny``; returns the URI."""
    bucket = unique("ckpt")
    s3.create_bucket(Bucket=bucket)
    upload_folder(tiny_model, lambda name, path: s3.upload_file(str(path), bucket, f"llm-atc/tiny/{name}"))
    return f"s3://{bucket}/llm-atc/tiny"


@pytest.fixture
def gcs_checkpoint(gcs, tiny_model):
    """The tiny model uploaded to ``gs://<bucket>/llm-atc/tiny``; returns the URI."""
    bucket = gcs.create_bucket(unique("ckpt"))
    upload_folder(tiny_model, lambda name, path: bucket.blob(f"llm-atc/tiny/{name}").upload_from_filename(str(path)))
    return f"gs://{bucket.name}/llm-atc/tiny"


class CLIResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self):
        return f"<exit {self.exit_code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}>"


@pytest.fixture
def cli():
    """Run ``llm-atc ARGS`` in-process through Click's CliRunner (stdout and stderr apart)."""
    from click.testing import CliRunner

    from llm_atc.cli import cli as command

    def run(*args: str, input: str | None = None) -> CLIResult:
        runner = CliRunner(mix_stderr=False)
        result = runner.invoke(command, list(args), input=input, catch_exceptions=False, prog_name="llm-atc")
        return CLIResult(result.exit_code, result.stdout, result.stderr)

    return run


def assert_one_line_error(result: CLIResult, *fragments: str) -> None:
    """A user mistake: non-zero exit, one ``Error:`` line naming the problem, no traceback of ours.

    Progress lines may come before it; an engine's own log tail may follow it.
    """
    assert result.exit_code != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1, result
    assert not any("Traceback" in line for line in lines[: errors[0] + 1]), result
    assert "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[errors[0]], result


@pytest.fixture(scope="session")
def sky_api_server():
    """SkyPilot's real local API server, in this session's HOME on its own port."""
    from llm_atc.backends.skypilot import import_sky

    sky = import_sky()
    sky.get(sky.status())  # the first call starts the server
    yield sky
    sky.api_stop()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
