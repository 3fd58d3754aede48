"""The CLI shell: fast start-up, packaging, recipes, docs in step with --help."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from support.paths import ROOT


def test_a_vllm_args_typo_is_reported_before_skypilot_is_imported():
    """--accelerator auto reads SkyPilot's catalog; a typo in --vllm_args is refused before that (and before
    any other I/O), in one line."""
    code = (
        "import sys; from click.testing import CliRunner; from llm_atc.cli import cli\n"
        "result = CliRunner().invoke(cli, ['serve', '--name', 'Qwen/Qwen2.5-7B-Instruct', '--cloud', 'aws',"
        " '--accelerator', 'auto', '--vllm_args', '--enable-prefx-caching', '--dryrun'])\n"
        "print(result.exit_code, 'sky' in sys.modules, result.output.strip().splitlines())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "2 False ['Error: --vllm_args --enable-prefx-caching: vLLM 0.32.0 has no such flag; "
        "did you mean --enable-prefix-caching?']"
    )


def test_help_imports_no_heavy_module():
    code = (
        "import sys; from llm_atc.cli import main; sys.argv = ['llm-atc', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('sky', 'torch', 'transformers', 'boto3', 'google.cloud.storage')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "serve" in out and "recipes" in out


def test_every_command_has_help(cli):
    from llm_atc.cli import COMMANDS

    for name in COMMANDS:
        result = cli(name, "--help")
        assert result.exit_code == 0 and f"Usage: llm-atc {name}" in result.stdout


def test_cli_reference_is_up_to_date():
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_recipes_lists_every_recipe_and_alias(cli):
    result = cli("recipes")
    assert result.exit_code == 0
    for ref in ("serve/vllm", "serve/transformers"):
        assert ref in result.stdout
    assert cli("show-models").stdout == result.stdout


def test_unknown_command_is_a_usage_error(cli):
    result = cli("launch")
    assert result.exit_code == 2 and "No such command" in result.stderr


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory) -> Path:
    """llm-atc installed non-editable from a built wheel into a fresh venv.

    The venv sees this test environment's site-packages for the dependencies
    (through a .pth file) but has its own copy of llm_atc.
    """
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    target = work / "venv"
    venv.create(target, with_pip=False)
    site = next(target.glob("lib/python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    (wheel,) = wheels.glob("llm_atc-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def test_recipes_ship_inside_the_installed_package(installed_venv, tmp_path):
    out = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-m", "llm_atc", "recipes", "--path"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert "serve/vllm" in out and "serve/transformers" in out
    assert str(installed_venv) in out and str(ROOT / "recipes") not in out
    flags = subprocess.run(
        [
            str(installed_venv / "bin" / "python"),
            "-c",
            "from llm_atc.vllm_flags import pinned_flags; print(pinned_flags()[0])",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert flags.strip() == "0.32.0"  # the flag list --vllm_args is checked against ships with the package


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/llm-atc engines install vllm guidellm"
        " && bash scripts/slurm-up.sh && .venv/bin/python -m pytest"
    )
    assert f"```bash\n{command}\n```" in readme
    assert command in ci


def test_code_style():
    """ruff's lint and format checks (settings in pyproject.toml) pass on the whole tree."""
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "ruff"), *args], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_types():
    """mypy (settings in pyproject.toml) passes: callers keep to the backend protocol, Optional values are
    checked before use."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mypy")], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_rule_for_secret_names_everywhere(cli):
    """README, the serving guide and --help state the same rule as the code that applies it."""
    from llm_atc.options import SECRET_RULE, is_secret_name

    for doc in (ROOT / "README.md", ROOT / "docs" / "serving.md", ROOT / "docs" / "cli.md"):
        assert SECRET_RULE in " ".join(doc.read_text().split()), doc
    assert SECRET_RULE.split(" (")[0] in " ".join(cli("serve", "--help").stdout.split())
    for name, secret in (
        ("HF_TOKEN", True),
        ("WANDB_API_KEY", True),
        ("AWS_ACCESS_KEY_ID", True),
        ("DB_PASSWORD", True),
        ("OPENAI_API_KEY", True),
        ("MODEL_SIZE", False),
        ("VLLM_CPU_KVCACHE_SPACE", False),
    ):
        assert is_secret_name(name) is secret, name
