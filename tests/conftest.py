"""Shared fixtures: an isolated HOME, real object-store emulators, a tiny model, the CLI.

Every server started here binds 127.0.0.1 on a free port, is waited for with a
bounded loop, and is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.buckets import upload_folder
from support.cli import CLIResult, run_cli, unique, using_home
from support.net import Server, free_port, wait_http
from support.paths import BIN, ROOT
from support.processes import tear_down_on_sigterm
from support.sky_boundary import FAKE_CLOUD_NAMES, FakeSky
from support.training import sharegpt, train_args
from support.vllm_setup import CHAT_TEMPLATE, EOS_TOKEN, RESPONSE_ROLE, VLLM_KEY

# Engines (`llm-atc engines install vllm`, a few GB) are installed once per machine, in the
# user's own llm-atc home; the tests use them from there.
os.environ.setdefault(
    "LLM_ATC_ENGINES", str(Path(os.environ.get("LLM_ATC_HOME") or Path.home() / ".llm_atc") / "engines")
)
# SkyPilot reads HOME and its server port when first imported, so the whole test
# session gets its own HOME and API server port before anything imports it.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="llm-atc-tests-home-"))
os.environ["HOME"] = str(_SESSION_HOME)
# Managed jobs' controller runs inside the session's API server (no controller VM to provision).
(_SESSION_HOME / ".sky").mkdir()
(_SESSION_HOME / ".sky" / "config.yaml").write_text("jobs:\n  controller:\n    consolidation_mode: true\n")
os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
for _var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)  # the Hub cache is the session HOME's own (empty): nothing answers from elsewhere
os.environ.pop("LLM_ATC_HOME", None)
for _var in ("AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "AWS_PROFILE"):
    os.environ.pop(_var, None)

# Started in the background (`nohup ... &`), a shell hands its children SIGINT ignored, and they would
# pass that on to every command the tests interrupt with Ctrl-C: give them the default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
tear_down_on_sigterm()  # a session ended by SIGTERM still stops its API server, emulators and engines

sys.path.insert(0, str(Path(__file__).parent))

os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = str(free_port())


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
    from llm_atc.demo import build_tiny_model

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


@pytest.fixture(scope="session")
def sky_api_server():
    """SkyPilot's real local API server, in this session's HOME on its own port."""
    from llm_atc.sky_sdk import import_sky

    sky = import_sky()
    sky.get(sky.status())  # the first call starts the server
    yield sky
    sky.api_stop()


def pytest_sessionfinish(session, exitstatus):
    """Every test stops what it starts: SkyPilot's API server of this session is stopped here (the fixture
    that started it may not have run); anything else still running with the session's HOME fails the run
    (and is stopped, so that no machine collects them)."""
    from support.processes import command_line, end_leftovers, started_with_home

    if any("sky.server" in command_line(p) for p in started_with_home(str(_SESSION_HOME))):
        from llm_atc.sky_sdk import import_sky

        with contextlib.suppress(Exception):
            import_sky().api_stop()
    leftovers = end_leftovers(str(_SESSION_HOME))
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"{len(leftovers)} process(es) outlived the tests that started them:", red=True)
            for line in leftovers:
                reporter.write_line(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- the real vLLM server (CPU build) ------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_engine():
    """The vLLM engine environment llm-atc manages (README's test command installs it)."""
    from llm_atc import engines

    found = engines.installed("vllm")
    if found is None:
        pytest.fail(
            "vLLM is not installed for llm-atc: run `.venv/bin/llm-atc engines install vllm` "
            f"(it goes to {engines.engines_home()})"
        )
    return found


@pytest.fixture(scope="session")
def session_home(session_dir) -> Path:
    """An ``$LLM_ATC_HOME`` shared by the session-wide training run and deployment."""
    return session_dir / "llm_atc_home"


@pytest.fixture(scope="session")
def lora_run(session_home, session_dir, tiny_model) -> str:
    """A LoRA adapter (MERGE=0) that `llm-atc train --cloud local` trained on the tiny model; its run name."""
    data = session_dir / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    with using_home(session_home):
        result = run_cli(
            *train_args(data, tiny_model, "tiny-lora", "--envs", "MERGE=0 MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2")
        )
    assert result.exit_code == 0, result
    return "tiny-lora"


@dataclass
class LiveDeployment:
    """A deployment started by `llm-atc serve --cloud local` and still running."""

    home: Path
    cluster: str
    base_url: str
    api_key: str
    model: str
    adapter: str
    marker: Path
    result: CLIResult

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(
            base_url=self.base_url, api_key=kwargs.pop("api_key", self.api_key), max_retries=0, timeout=60, **kwargs
        )


@pytest.fixture(scope="session")
def vllm_deployment(vllm_engine, session_home, session_dir, tiny_model, lora_run):
    """The real vLLM OpenAI server (CPU build) on the tiny model, started once per session by
    `llm-atc serve --cloud local --engine auto` with an API key, a chat template, an extra EOS token,
    a context length, a LoRA adapter from `llm-atc train`, and extra engine flags."""
    template = session_dir / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    marker = session_dir / "pwned"
    with using_home(session_home):
        result = run_cli(
            "serve",
            "--name",
            str(tiny_model),
            "--cloud",
            "local",
            "--engine",
            "auto",
            "--port",
            "0",
            "-c",
            "vllm-session",
            "--max_model_len",
            "128",
            "--chat_template",
            str(template),
            "--eos_token",
            EOS_TOKEN,
            "--lora",
            f"ad=llm-atc/{lora_run}",
            "--vllm_args",
            f"--enforce-eager --response-role '{RESPONSE_ROLE.format(marker=marker)}'",
            "--envs",
            f"VLLM_CPU_KVCACHE_SPACE=1 NOTE='$(touch {marker})'",
            "--secret",
            f"VLLM_API_KEY={VLLM_KEY}",
            "--timeout",
            "600",
            # The names the cloud deployments of the tests serve (their "VM" is this server: see fake_sky).
            *[arg for name in FAKE_CLOUD_NAMES for arg in ("--alias", name)],
        )
        assert result.exit_code == 0, result
        from llm_atc.registry import Registry

        record = Registry().find("vllm-session")
    try:
        yield LiveDeployment(
            session_home, "vllm-session", record.endpoint + "/v1", VLLM_KEY, str(tiny_model), "ad", marker, result
        )
    finally:
        with using_home(session_home):
            run_cli("stop", "vllm-session")


# --- the one boundary that cannot run here: a public cloud provisioning a GPU VM -----------------


@pytest.fixture
def sky_boundary(monkeypatch):
    """``install(**FakeSky options)`` puts a FakeSky behind every SkyPilotBackend; returns it."""
    from llm_atc.backends.skypilot import SkyPilotBackend

    holder = {}

    def install(**kwargs):
        holder["sky"] = FakeSky(**kwargs)
        monkeypatch.setattr(SkyPilotBackend, "sdk", property(lambda self: holder["sky"]))
        return holder["sky"]

    return install


@pytest.fixture
def fake_sky(sky_boundary, vllm_deployment):
    """The SkyPilot boundary, whose "VM" serves with the session's real vLLM server (key VLLM_KEY)."""
    url = vllm_deployment.base_url.removeprefix("http://").removesuffix("/v1")
    return lambda **kwargs: sky_boundary(engine_url=url, **kwargs)


# --- SkyPilot's GPU catalog, offline: a fixture copy where SkyPilot reads it ----------------------------

CATALOG = ROOT / "tests" / "fixtures" / "catalog" / "v8"


@pytest.fixture(scope="module")
def catalog():
    """The fixture catalog where SkyPilot reads its catalog (fixed when sky was imported: this
    session's HOME, or SKY_RUNTIME_DIR); whatever was there is put back afterwards."""
    from llm_atc.planning import catalog as sky_catalog

    target = sky_catalog.catalog_dir()
    backup = target.with_name(target.name + ".llm-atc-test-backup")
    if target.exists():
        target.rename(backup)
    shutil.copytree(CATALOG, target)
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)
        if backup.exists():
            backup.rename(target)


@pytest.fixture(scope="session")
def tls_files(session_dir) -> dict:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-atc-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder = session_dir / "tls"
    folder.mkdir()
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {"cert": folder / "cert.pem", "key": folder / "key.pem"}
