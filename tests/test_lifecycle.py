"""One lifecycle: records that always tell the truth, on every backend, whatever happens to the process.

Real processes (engines, training runs, llm-atc itself, signals), real SQLite and real concurrency;
the SkyPilot boundary (a cloud provisioning VMs) is the recording FakeSky of support/sky_boundary.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from support.cli import assert_one_line_error, unique
from support.net import free_port
from support.paths import BIN, ROOT
from support.processes import group_of
from support.training import sharegpt, train_args


def registry():
    from llm_atc.registry import Registry

    return Registry()


def add(**fields):
    from llm_atc.registry import Record

    defaults = dict(name="m", kind="serve", model="m", cluster=unique("c"), status="RUNNING", cloud="aws")
    return registry().add(Record(**{**defaults, **fields}))


def run_llm_atc(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "llm-atc"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for(check, timeout: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


# --- processes on this machine ------------------------------------------------------------------------


def test_stop_ends_the_whole_process_group_not_only_its_leader(tmp_path):
    """A leader with a child that ignores SIGTERM and SIGINT: after stop, nothing of the group is left."""
    from llm_atc.backends.local import LocalBackend, start_time
    from llm_atc.registry import Record

    script = "trap '' TERM INT; sleep 300 & wait"
    proc = subprocess.Popen(["bash", "-c", f'bash -c "{script}" & sleep 300'], start_new_session=True)
    try:
        wait_for(lambda: len(group_of(proc.pid)) >= 3, what="the group's processes to start")
        record = Record(
            name="g",
            kind="serve",
            model="m",
            cluster="g",
            status="RUNNING",
            cloud="local",
            pid=proc.pid,
            details={"started": start_time(proc.pid)},
        )
        LocalBackend().stop(record)
        assert group_of(proc.pid) == []
    finally:
        if group_of(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_reused_pid_is_never_taken_for_ours(cli):
    """A record whose pid now belongs to another program (another start time): not running, and stop leaves
    that program alone."""
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = add(
            cloud="local",
            kind="serve",
            pid=other.pid,
            port=free_port(),
            endpoint="http://127.0.0.1:1",
            details={"started": psutil.Process(other.pid).create_time() - 1000, "log": "/nonexistent"},
        )
        status = cli("status")
        assert "FAILED" in next(line for line in status.stdout.splitlines() if record.cluster in line)
        assert cli("stop", record.cluster).exit_code == 0
        assert cli("down", record.cluster).exit_code == 0
        assert other.poll() is None and psutil.Process(other.pid).is_running()
    finally:
        other.kill()
        other.wait(10)


def test_a_process_is_known_by_its_start_in_ticks_not_by_the_clock():
    """The boot time behind a start time in seconds is recomputed from the clock, and a clock adjustment of a
    few milliseconds can move it by a whole second: a live engine must not then look dead (it did, to `top`,
    late in a long test session). The start in clock ticks since boot identifies the process instead."""
    from llm_atc.backends.local import LocalBackend, start_ticks
    from llm_atc.registry import Record

    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        ticks, started = start_ticks(proc.pid), psutil.Process(proc.pid).create_time()
        assert isinstance(ticks, int)

        def record(**details):
            return Record(name="p", kind="serve", model="m", cluster="p", status="RUNNING", cloud="local",
                          pid=proc.pid, details=details)  # fmt: skip

        backend = LocalBackend()
        assert backend.alive(record(started=started + 1.0, start_ticks=ticks))  # the clock moved, not the process
        assert not backend.alive(record(started=started, start_ticks=ticks + 1))  # another process with that pid
        assert backend.alive(record(started=started + 1.0))  # records from before: within the drift
        assert not backend.alive(record(started=started - 1000))
    finally:
        proc.kill()
        proc.wait(10)


def serve_process(tiny_model, cluster: str, port: int, *extra: str) -> subprocess.Popen:
    args = [
        str(BIN / "llm-atc"),
        "serve",
        "--name",
        str(tiny_model),
        "--cloud",
        "local",
        "--engine",
        "transformers",
        "--port",
        str(port),
        "-c",
        cluster,
        "--timeout",
        "120",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_while_waiting_stops_the_engine_it_started(tiny_model, sig, code):
    """SIGTERM or SIGHUP while a local serve waits for readiness: the engine's group is stopped, the
    record says STOPPED, and llm-atc exits 128+signal."""
    cluster = unique("sig")
    proc = serve_process(tiny_model, cluster, free_port())
    try:
        wait_for(lambda: any(r.pid and r.cluster == cluster for r in registry().records()), what="the engine start")
        engine = registry().find(cluster).pid
        proc.send_signal(sig)
        assert proc.wait(60) == code
        assert group_of(engine) == []
        assert registry().find(cluster).status == "STOPPED"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_two_serves_on_one_port_at_once_one_wins(tiny_model):
    """Started together on one port, exactly one serve succeeds; the other says in one line that the port
    is taken, and records nothing running."""
    port = free_port()
    clusters = [unique("race-a"), unique("race-b")]
    procs = [serve_process(tiny_model, cluster, port) for cluster in clusters]
    try:
        results = [(proc.wait(180), *proc.communicate()) for proc in procs]
        codes = sorted(code for code, *_ in results)
        assert codes[0] == 0 and codes[1] != 0, results
        loser = next(err for code, _, err in results if code != 0)
        assert f"port {port}" in loser and loser.count("Error:") == 1, loser
        winner = next(c for c, (code, *_) in zip(clusters, results, strict=True) if code == 0)
        running = [r.cluster for r in registry().records() if r.status == "RUNNING"]
        assert running == [winner]
    finally:
        for cluster in clusters:
            run_llm_atc("down", cluster, "-y")


# --- local training: killed, stopped, resumed, its name freed -------------------------------------------


@pytest.fixture
def long_data(tmp_path) -> Path:
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt(64)))
    return data


LONG_RUN = "MAX_STEPS=5000 SAVE_STEPS=10 MAX_SEQ_LEN=64 BATCH_SIZE=1 GRAD_ACCUM=4"


def test_a_killed_llm_atc_leaves_a_run_whose_state_stays_true(cli, tiny_model, long_data, llm_atc_home):
    """llm-atc killed while training here: the run's record follows its process (RUNNING while it runs);
    `stop` really stops it (STOPPED), `train --resume` continues from its last checkpoint, and after
    `down` the name is free for a new run."""
    name = unique("killed-run")
    proc = subprocess.Popen(
        [str(BIN / "llm-atc"), *train_args(long_data, tiny_model, name, "--envs", LONG_RUN)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=False,
    )
    work = llm_atc_home / "local" / f"llm-atc-train-{name}" / "work" / "checkpoints"
    wait_for(
        lambda: work.is_dir() and any(work.glob("checkpoint-*/trainer_state.json")),
        timeout=120,
        what="a first checkpoint",
    )
    proc.kill()  # llm-atc itself dies; the run's process group goes on
    proc.wait(10)
    record = registry().find(name, kind="train")
    assert group_of(record.pid)
    shown = cli("status")
    assert shown.exit_code == 0, shown
    line = next(line for line in shown.stdout.splitlines() if name in line)
    assert "RUNNING" in line, line

    stopped = cli("stop", name, "-y")
    assert stopped.exit_code == 0 and "Stopped" in stopped.stderr, stopped
    assert group_of(record.pid) == []
    assert registry().find(name, kind="train").status == "STOPPED"

    again = cli(*train_args(long_data, tiny_model, name, "--envs", LONG_RUN))
    assert_one_line_error(again, f"'{name}' exists (STOPPED)", "--resume")

    last = max(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    resumed = cli(
        *train_args(
            long_data,
            tiny_model,
            name,
            "--resume",
            "--envs",
            LONG_RUN.replace("MAX_STEPS=5000", f"MAX_STEPS={last + 2}"),
        )
    )
    assert resumed.exit_code == 0, resumed
    assert "resuming from" in resumed.stderr and "training finished" in resumed.stderr
    assert registry().find(name, kind="train").status == "SUCCEEDED"

    down = cli("down", name, "-y")
    assert down.exit_code == 0, down
    fresh = cli(*train_args(long_data, tiny_model, name, "--envs", "MAX_STEPS=2 MAX_SEQ_LEN=64 BATCH_SIZE=2"))
    assert_one_line_error(fresh, "already holds a model")  # down frees the name, never deletes a model


def test_a_run_left_behind_is_reconciled_by_its_log(cli, tiny_model, long_data, llm_atc_home):
    """A local run whose llm-atc is gone and whose process then ends on its own: SUCCEEDED when the
    training printed its last line, FAILED when it was killed."""
    for outcome, kill in (("SUCCEEDED", False), ("FAILED", True)):
        name = unique("left")
        proc = subprocess.Popen(
            [
                str(BIN / "llm-atc"),
                *train_args(
                    long_data, tiny_model, name, "--envs", "MAX_STEPS=40 SAVE_STEPS=1000 MAX_SEQ_LEN=64 BATCH_SIZE=1"
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = lambda name=name: any(r.pid for r in registry().records(kind="train") if r.name == name)
        wait_for(started, what="the run")
        proc.kill()
        proc.wait(10)
        record = registry().find(name, kind="train")
        if kill:
            os.killpg(record.pid, signal.SIGKILL)
        wait_for(lambda pid=record.pid: not group_of(pid), timeout=120, what="the run's end")
        line = next(line for line in cli("status").stdout.splitlines() if name in line)
        assert outcome in line, line


# --- SkyPilot: every kind of record, through the recording boundary ------------------------------------


def cloud_train(cli, s3, tmp_path, bucket: str, name: str, *extra: str):
    """`llm-atc train` of a LoRA run into a new moto bucket, on a cloud (the recording boundary)."""
    s3.create_bucket(Bucket=bucket)
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(sharegpt()))
    args = f"--model_type lora --checkpoint_bucket {bucket} --checkpoint_store S3 --accelerator L4:1 -y".split()
    return cli("train", "--finetune_data", str(data), "--name", name, *args, *extra)


def test_a_spot_run_is_a_managed_job_whose_state_and_logs_are_its_own(cli, s3, sky_boundary, tmp_path):
    """--use_spot: the run is a managed job; status follows the jobs controller (not a cluster that does
    not exist) and logs are the managed job's."""
    sky = sky_boundary()
    result = cloud_train(cli, s3, tmp_path, "spot", "spot-run", "--use_spot")
    assert result.exit_code == 0, result
    (job_id,) = sky.jobs.statuses
    for managed, shown in (("RUNNING", "RUNNING"), ("RECOVERING", "RUNNING"), ("SUCCEEDED", "SUCCEEDED")):
        sky.jobs.statuses[job_id] = managed
        status = cli("status")
        assert shown in next(line for line in status.stdout.splitlines() if "spot-run" in line), status
    assert f"managed job {job_id}" in cli("logs", "spot-run").stdout
    assert sky.launches == [] and sky.downs == []


def test_stop_of_a_cloud_run_cancels_its_job_and_keeps_its_checkpoints(cli, s3, sky_boundary, tmp_path):
    sky = sky_boundary()
    result = cloud_train(cli, s3, tmp_path, "stoppable", "cloud-run", "--detach_run")
    assert result.exit_code == 0, result
    s3.put_object(Bucket="stoppable", Key="llm-atc/cloud-run/checkpoints/checkpoint-10/x", Body=b"1")
    stopped = cli("stop", "cloud-run", "-y")
    assert stopped.exit_code == 0 and "Stopped cloud-run" in stopped.stderr, stopped
    assert sky.cancels == [("llm-atc-train-cloud-run", [1])]
    assert registry().find("cloud-run", kind="train").status == "STOPPED"
    assert "Contents" in s3.list_objects_v2(Bucket="stoppable", Prefix="llm-atc/cloud-run/checkpoints/")

    down = cli("down", "cloud-run", "-y")  # ends it for good: the cluster, and the partial checkpoints
    assert down.exit_code == 0, down
    assert sky.downs == ["llm-atc-train-cloud-run"]
    assert "Contents" not in s3.list_objects_v2(Bucket="stoppable", Prefix="llm-atc/cloud-run/checkpoints/")


def test_an_attached_cloud_run_tears_its_cluster_down_when_it_ends(cli, s3, sky_boundary, tmp_path):
    sky = sky_boundary(job_status="SUCCEEDED")
    result = cloud_train(cli, s3, tmp_path, "attached", "att")
    assert result.exit_code == 0, result
    assert sky.downs == ["llm-atc-train-att"]
    assert registry().find("att", kind="train").status == "SUCCEEDED"


def test_a_cluster_stopped_or_torn_down_outside_llm_atc_shows_as_such(cli, sky_boundary):
    sky = sky_boundary()
    stopped, gone = add(cluster="by-sky-stop"), add(cluster="by-sky-down")
    sky.clusters = {"by-sky-stop": "STOPPED"}
    status = cli("status", "-a")
    rows = {line.split()[2]: line for line in status.stdout.splitlines()[1:] if line.strip()}
    assert "STOPPED" in rows[stopped.cluster] and "RUNNING" not in rows[stopped.cluster]
    assert "DOWN" in rows[gone.cluster]
    sky.clusters = {"by-sky-stop": "UP"}  # started again with `sky start`
    assert "RUNNING" in next(line for line in cli("status").stdout.splitlines() if "by-sky-stop" in line)


def test_down_after_a_failed_launch_forgets_the_record_and_its_key(cli, sky_boundary, llm_atc_home):
    """A launch SkyPilot refuses (no capacity): FAILED; `down` then succeeds although there is no cluster,
    and the row and its API key are gone from `status` and the key store."""
    import sky as sky_module

    sky = sky_boundary()

    def no_capacity(task, **kwargs):
        raise sky_module.exceptions.ResourcesUnavailableError("Failed to acquire resources in all zones.")

    sky.launch = no_capacity
    result = cli("serve", "--name", "Qwen/Qwen2.5-7B", "-c", "no-gpus", "-y")
    assert_one_line_error(result, "Failed to acquire resources")
    from llm_atc import credentials

    assert registry().find("no-gpus").status == "FAILED" and credentials.get("no-gpus")
    down = cli("down", "no-gpus", "-y")
    assert down.exit_code == 0 and "already gone" in down.stderr, down
    assert credentials.get("no-gpus") is None
    assert "no-gpus" not in cli("status").stdout
    assert registry().find("no-gpus").status == "DOWN"


# --- state stores: concurrency, damage, privacy ------------------------------------------------------------


def run_workers(code: str, count: int, home: Path) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "LLM_ATC_HOME": str(home), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def test_api_keys_saved_by_many_processes_at_once_are_all_kept(tmp_path):
    done = run_workers(
        """
        import sys
        from llm_atc import credentials
        for n in range(50):
            credentials.save(f"w{sys.argv[1]}-{n}", f"key-{sys.argv[1]}-{n}")
    """,
        8,
        tmp_path,
    )
    assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
    os.environ["LLM_ATC_HOME"] = str(tmp_path)
    from llm_atc import credentials

    assert len(credentials.clusters()) == 400
    assert credentials.get("w7-49") == "key-7-49"


def test_a_new_registry_opened_by_many_processes_at_once_is_migrated_once(tmp_path):
    """The migration race ("table deployments already exists") never happens, in several trials."""
    from llm_atc.registry import MIGRATIONS

    for trial in range(4):
        home = tmp_path / f"trial-{trial}"
        done = run_workers(
            """
            from llm_atc.registry import Registry, Record
            Registry().add(Record(name="m", kind="serve", model="m", cluster="c", status="RUNNING"))
        """,
            10,
            home,
        )
        assert all(d.returncode == 0 for d in done), [d.stderr[-500:] for d in done if d.returncode]
        conn = sqlite3.connect(home / "registry.db")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT COUNT(*) FROM deployments").fetchone()[0] == 10


def test_a_damaged_registry_or_key_store_is_one_line_naming_the_file(cli, llm_atc_home):
    llm_atc_home.mkdir(parents=True, exist_ok=True)
    (llm_atc_home / "registry.db").write_bytes(b"this is not SQLite" * 100)
    result = cli("status")
    assert_one_line_error(result, str(llm_atc_home / "registry.db"), "damaged", "mv ")
    (llm_atc_home / "registry.db").unlink()
    add(cluster="keyed")
    (llm_atc_home / "credentials.db").write_bytes(b"garbage" * 100)
    assert_one_line_error(cli("endpoint", "keyed", "--show_key"), str(llm_atc_home / "credentials.db"), "damaged")


def test_one_unreadable_row_does_not_hide_the_others(cli, llm_atc_home):
    good = add(cluster="good-one")
    bad = add(cluster="bad-one")
    conn = sqlite3.connect(llm_atc_home / "registry.db")
    conn.execute("UPDATE deployments SET details = '{not json' WHERE id = ?", (bad.id,))
    conn.commit()
    conn.close()
    result = cli("status", "-a")
    assert result.exit_code == 0, result
    assert good.cluster in result.stdout and "bad-one" not in result.stdout
    assert f"row {bad.id} cannot be read" in result.stderr


def test_state_is_private(cli, llm_atc_home, tiny_model):
    result = cli(
        "serve",
        "--name",
        "Qwen/Qwen2.5-7B",
        "--cloud",
        "gcp",
        "--chat_template",
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "--dryrun",
    )
    assert result.exit_code == 0, result
    add(cluster="private")
    from llm_atc import credentials

    credentials.save("private", "k")
    paths = [llm_atc_home, *llm_atc_home.rglob("*")]
    assert len(paths) > 4
    for path in paths:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


# --- validation never imports SkyPilot -----------------------------------------------------------------------


def test_a_typo_on_a_cloud_serve_is_reported_without_importing_skypilot(tmp_path):
    """Every option is checked before any lookup: with --accelerator auto (which reads SkyPilot's catalog), a typo
    in --envs, --replicas or train's --envs is reported with SkyPilot never imported."""
    data = tmp_path / "data.json"
    data.write_text("[]")
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys
        from llm_atc.errors import UserError
        from llm_atc.app.serve import serve_spec
        from llm_atc.app.train import train_spec
        for attempt in (
            lambda: serve_spec("Qwen/Qwen2.5-7B", cloud="gcp", replicas="abc"),
            lambda: serve_spec("Qwen/Qwen2.5-7B", cloud="gcp", accelerator="auto", envs=["9X=1"]),
            lambda: train_spec(model_type="lora", finetune_data={str(data)!r}, checkpoint_bucket="b",
                               checkpoint_store="S3", cloud="gcp", accelerator="auto", envs=["EPOCHS=abc"]),
        ):
            try:
                attempt()
            except UserError as exc:
                print(exc)
        serve_spec("Qwen/Qwen2.5-7B", cloud="kubernetes", accelerator="H100:8")
        print("sky" in sys.modules)
    """),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path), "LLM_ATC_HOME": str(tmp_path / "home")},
    )
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert lines[0] == "--replicas 'abc': give N or MIN..MAX, e.g. 2 or 0..4"
    assert lines[1].startswith("--envs") and "9X" in lines[1]
    assert lines[2].startswith("--envs") and "EPOCHS" in lines[2]
    assert lines[3:] == ["False"]


def test_the_shipped_infra_names_are_skypilots():
    from llm_atc.options import skypilot_infra
    from llm_atc.sky_sdk import import_sky

    sky = import_sky()
    from sky.utils import registry as sky_registry

    version, names = skypilot_infra()
    assert version == sky.__version__
    assert names == {**{n: n for n in sky_registry.CLOUD_REGISTRY.keys()}, **sky_registry.CLOUD_REGISTRY._aliases}


def test_the_planner_sizes_training_with_the_recipes_settings():
    """One source of truth: the QLoRA recipe trains rank 64, the LoRA one rank 16, and --envs overrides."""
    from llm_atc.planning import estimate_memory

    config = json.loads((ROOT / "tests" / "fixtures" / "model_configs" / "Llama-2-7b-hf.config.json").read_text())
    qlora, lora = estimate_memory(config, mode="qlora"), estimate_memory(config, mode="lora")
    assert "LoRA r=64" in qlora.state_formula and "LoRA r=16" in lora.state_formula
    assert "LoRA r=8" in estimate_memory(config, mode="lora", train_envs={"LORA_R": "8"}).state_formula
    assert estimate_memory(config, mode="full", train_envs={"MAX_SEQ_LEN": "512"}).max_model_len == 512


# --- the tunnel and readiness: fast failures for what used to hang or leak ---------------------------------


@pytest.fixture
def sshd(tmp_path):
    """A real sshd of this test's own on 127.0.0.1 (a free port, its own host and login keys); (port, login key)."""
    import shutil
    import socket
    import subprocess
    import time

    from support.net import free_port

    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary):
        pytest.fail("no sshd: install openssh-server (README's test command does, with scripts/slurm-up.sh)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "login"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "login.pub").read_text())
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {keys / 'sshd.pid'}\nAllowTcpForwarding local\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    server = subprocess.Popen([binary, "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None and time.monotonic() < deadline, "sshd did not start"
            time.sleep(0.1)
        yield port, keys / "login"
    finally:
        server.terminate()
        server.wait(10)


def test_the_tunnel_listens_on_loopback_only(tmp_path, monkeypatch, sshd):
    """`endpoint --forward`'s tunnel (real ssh to a real sshd on 127.0.0.1) binds 127.0.0.1 only, carries requests
    to the engine, and is gone when closed."""
    import getpass
    import http.server
    import threading

    port, login = sshd

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    config = tmp_path / "ssh.config"
    config.write_text(
        f"Host tunnel-test\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n  IdentityFile {login}\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
    )
    from llm_atc import tunnel
    from llm_atc.backends import skypilot
    from llm_atc.registry import Record

    monkeypatch.setattr(skypilot, "ssh_config", lambda cluster: config)
    record = Record(
        name="t",
        kind="serve",
        model="m",
        cluster="tunnel-test",
        status="RUNNING",
        cloud="slurm",
        engine="transformers",
        port=engine.server_address[1],
    )
    try:
        with tunnel.forward(record, timeout=30) as opened:
            listening = [
                c.laddr
                for c in psutil.Process(opened.process.pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
            assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
            import urllib.request

            assert urllib.request.urlopen(opened.endpoint + "/health", timeout=10).status == 200
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", opened.local_port)) != 0
    finally:
        engine.shutdown()


def test_a_wrong_readiness_path_fails_in_seconds_not_at_the_timeout(cli, tiny_model, monkeypatch):
    """An engine that answers 404 on the readiness path fails the wait at once (one line), long before
    --timeout, and its engine is stopped."""
    from llm_atc import readiness

    monkeypatch.setitem(readiness.READY_PATHS, "transformers", "/no-such-path")
    cluster = unique("wrong-path")
    start = time.monotonic()
    result = cli(
        "serve",
        "--name",
        str(tiny_model),
        "--cloud",
        "local",
        "--engine",
        "transformers",
        "--port",
        "0",
        "-c",
        cluster,
        "--timeout",
        "600",
    )
    assert_one_line_error(result, "answers 404 on /no-such-path")
    assert time.monotonic() - start < 120
    record = registry().find(cluster)
    assert record.status == "FAILED" and group_of(record.pid) == []


def test_a_test_session_ended_by_sigterm_still_stops_what_it_started(tmp_path):
    """`timeout` or a CI runner ends pytest with SIGTERM: the session's fixtures still tear down (as with Ctrl-C),
    so the servers they started do not outlive it. A session fixture here starts a process and stops it at
    teardown; the session is sent SIGTERM while a test runs."""
    pid_file = tmp_path / "pid"
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(f"""
        import subprocess, sys
        import pytest
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from support.processes import tear_down_on_sigterm
        tear_down_on_sigterm()

        @pytest.fixture(scope="session")
        def server():
            process = subprocess.Popen(["sleep", "600"])
            open({str(pid_file)!r}, "w").write(str(process.pid))
            yield process
            process.kill()
            process.wait()
        """)
    )
    (tmp_path / "test_long.py").write_text("import time\n\ndef test_long(server):\n    time.sleep(120)\n")
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        started = int(pid_file.read_text())
        assert psutil.pid_exists(started)
        session.send_signal(signal.SIGTERM)
        session.wait(60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    gone = not psutil.pid_exists(started) or psutil.Process(started).status() == psutil.STATUS_ZOMBIE
    if not gone:
        os.kill(started, signal.SIGKILL)
    assert gone, session.stdout.read().decode() if session.stdout else ""
