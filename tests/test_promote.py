"""`llm-atc eval` and `promote` end to end: LoRA runs trained by `llm-atc train` on learnable synthetic chats,
scored and switched on the real vLLM OpenAI server (CPU build) through its endpoint, with a client calling the
stable name the whole time. SkyServe is the one part that cannot run here: its update call is asserted.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.chats import KEYS, mapping_chats, write_jsonl
from support.cli import assert_one_line_error, run_cli, unique, using_home
from support.serving import local_vllm
from support.training import train_args

DEPLOYMENT = "ev-dep"
LEARN = "MERGE=0 MAX_SEQ_LEN=64 BATCH_SIZE=8 EPOCHS=12 LR=5e-3 LORA_R=8"
PROMPTS = [f"item 9{i}: {key}" for i, key in enumerate(KEYS[:6])]


@dataclass
class Setup:
    home: Path
    model: str
    base_url: str


@pytest.fixture(scope="module")
def setup(vllm_engine, session_dir, tiny_model):
    """Runs `good` (the pattern) and `noise` (the same questions, shuffled answers), 20% held out; `tiny` (nothing
    held out); `other` (trained on a copy of the base elsewhere); and a vLLM deployment of the base."""
    import shutil

    home = session_dir / "promote-home"
    data = session_dir / "promote-data"
    data.mkdir()
    other_base = shutil.copytree(tiny_model, data / "other-base")
    runs = {
        "good": (write_jsonl(data / "good.jsonl", mapping_chats(200)), tiny_model, LEARN, "0.2"),
        "noise": (write_jsonl(data / "noise.jsonl", mapping_chats(200, shuffled=True)), tiny_model, LEARN, "0.2"),
        "tiny": (write_jsonl(data / "tiny.jsonl", mapping_chats(8)), tiny_model, "MERGE=0 MAX_STEPS=2", "0"),
        "other": (write_jsonl(data / "other.jsonl", mapping_chats(8)), other_base, "MERGE=0 MAX_STEPS=2", "0"),
    }
    with using_home(home):
        for name, (chats, base, envs, share) in runs.items():
            trained = run_cli(*train_args(chats, base, name, "--envs", envs, "--eval_fraction", share))
            assert trained.exit_code == 0, trained
        served = run_cli(*local_vllm(str(tiny_model), DEPLOYMENT))
        assert served.exit_code == 0, served
        from llm_atc.registry import Registry

        endpoint = Registry().find(DEPLOYMENT).endpoint
    try:
        yield Setup(home, str(tiny_model), endpoint)
    finally:
        with using_home(home):
            run_cli("stop", DEPLOYMENT)


def cli_in(setup: Setup, *args: str):
    with using_home(setup.home):
        return run_cli(*args)


def client(setup):
    """An OpenAI client of ``setup`` (this module's deployment) or of a LiveDeployment (the session's)."""
    from openai import OpenAI

    if hasattr(setup, "client"):
        return setup.client()
    return OpenAI(base_url=setup.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def answer(setup, model: str, prompt: str) -> str:
    reply = client(setup).chat.completions.create(
        model=model, max_tokens=2, temperature=0, messages=[{"role": "user", "content": prompt}]
    )
    return reply.choices[0].message.content or ""


def served(setup) -> set[str]:
    return {model.id for model in client(setup).models.list().data}


class Caller(threading.Thread):
    """A client calling model=NAME in a loop (bounded) until stopped: every reply, every failure."""

    def __init__(self, setup, name: str):
        super().__init__(daemon=True)
        self.setup, self.name = setup, name
        self.replies: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set() and len(self.replies) + len(self.failures) < 20_000:
            prompt = PROMPTS[len(self.replies) % len(PROMPTS)]
            try:
                self.replies.append((prompt, answer(self.setup, self.name, prompt)))
            except Exception as exc:  # every failure is kept and fails the test
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self):
        self.start()
        time.sleep(1)  # some replies before the switch
        return self

    def __exit__(self, *exc):
        time.sleep(1)  # and some after it
        self.stopping.set()
        self.join(60)


def switched_once(caller: Caller, before: dict[str, str], after: dict[str, str]) -> None:
    """Every request succeeded, and the replies went from ``before``'s version to ``after``'s at one point."""
    assert caller.failures == [] and len(caller.replies) > 10
    telling = [(p, a) for p, a in caller.replies if before[p] != after[p]]
    assert telling, "the two versions answer these prompts alike: the switch cannot be seen"
    sides = ["old" if a == before[p] else "new" if a == after[p] else f"neither: {a!r}" for p, a in telling]
    first_new = sides.index("new")
    assert sides[:first_new] == ["old"] * first_new and sides[first_new:] == ["new"] * (len(sides) - first_new), sides
    assert first_new > 0


def scores(setup: Setup, *args: str) -> dict:
    result = cli_in(setup, "eval", DEPLOYMENT, *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def test_the_run_keeps_its_held_out_share(setup, session_dir):
    from llm_atc.recipes.train.finetune import load_conversations, split_held_out

    chats = load_conversations(str(session_dir / "promote-data" / "good.jsonl"))
    kept = load_conversations(str(setup.home / "checkpoints" / "good" / "eval.jsonl"))
    assert kept == split_held_out(chats, 0.2)[1] and 20 <= len(kept) <= 60
    with using_home(setup.home):
        from llm_atc.registry import Registry

        record = Registry().find_run("good")
    assert record.details["eval_fraction"] == 0.2
    info = json.loads((setup.home / "checkpoints" / "good" / "llm-atc.json").read_text())
    assert info["held_out"] == {"file": "eval.jsonl", "conversations": len(kept), "fraction": 0.2}


def test_both_ways_of_scoring_agree(setup, tiny_model):
    """Prompt log-probabilities (one request per conversation) and token by token give the same loss, on an
    engine without LoRA; one with LoRA on this CPU build is never asked for prompt log-probabilities."""
    refused = cli_in(setup, "eval", DEPLOYMENT, "--run", "llm-atc/good", "--prompt_logprobs")
    assert_one_line_error(refused, "fails on prompt log-probabilities and would take the engine down")
    plain = unique("ev-plain")
    served = cli_in(setup, *local_vllm(str(tiny_model), plain, "--max_loras", "0"))
    try:
        assert served.exit_code == 0, served
        runs = []
        for how in ("--prompt_logprobs", "--per_token"):
            result = cli_in(setup, "eval", plain, "--run", "llm-atc/good", how, "--limit", "8", "--json")
            assert result.exit_code == 0, result
            runs.append(json.loads(result.stdout))
    finally:
        cli_in(setup, "stop", plain)
    (whole,), (token,) = (list(run["scores"].values()) for run in runs)
    assert whole["tokens"] == token["tokens"] and whole["nll"] == pytest.approx(token["nll"], abs=1e-3)
    assert runs[1]["requests"] > runs[0]["requests"]


def test_promote_switches_with_no_failed_request_and_rolls_back(setup):
    # the first version of `chat`: the noise run, forced in (it need not beat the base)
    first = cli_in(setup, "promote", "llm-atc/noise", "--on", DEPLOYMENT, "--as", "chat", "--force")
    assert first.exit_code == 0, first
    assert first.stdout.strip() == "chat@v1" and {"chat", "chat@v1"} <= served(setup)
    before = {p: answer(setup, "chat", p) for p in PROMPTS}

    with Caller(setup, "chat") as caller:
        promoted = cli_in(setup, "promote", "llm-atc/good", "--on", DEPLOYMENT, "--as", "chat", "--json")
    assert promoted.exit_code == 0, promoted
    result = json.loads(promoted.stdout)
    assert result["version"] == 2 and result["gain_low"] > 0 and not result["forced"]
    assert result["candidate"]["nll"] < result["current"]["nll"]
    after = {p: answer(setup, "chat@v2", p) for p in PROMPTS}
    assert {p: answer(setup, "chat@v1", p) for p in PROMPTS} == before  # the previous version stays loaded
    switched_once(caller, before, after)

    # the held-out loss of the learned run is clearly below the base's, through the endpoint
    measured = scores(setup, "--run", "llm-atc/good")["scores"]
    assert measured["chat"]["nll_high"] < measured[setup.model]["nll_low"]
    assert measured["chat"]["nll"] == pytest.approx(measured["chat@v2"]["nll"], abs=1e-4)

    # the noise run again, on the good run's held-out chats: refused with both numbers, nothing changed
    again = cli_in(setup, "promote", "llm-atc/noise", "--on", DEPLOYMENT, "--as", "chat", "--run", "llm-atc/good")
    assert_one_line_error(again, "llm-atc/noise is not better than chat by 0:", "nothing changed")
    numbers = again.stderr.split("Error: ")[1]
    assert f"{measured['chat']['nll']:.4f}" in numbers and "nats/token" in numbers
    assert "chat@v3" not in served(setup) and {p: answer(setup, "chat", p) for p in PROMPTS} == after

    listed = cli_in(setup, "adapters", "list", DEPLOYMENT)
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert rows["chat"][1:3] == ["llm-atc/good", "v2"] and rows["chat@v1"][1:3] == ["llm-atc/noise", "v1"]
    assert float(rows["chat"][3]) == pytest.approx(result["candidate"]["nll"], abs=1e-4)

    with Caller(setup, "chat") as caller:
        back = cli_in(setup, "promote", "--rollback", "--on", DEPLOYMENT, "--as", "chat")
    assert back.exit_code == 0, back
    switched_once(caller, after, before)

    import llm_atc

    with using_home(setup.home):
        forward = llm_atc.rollback(on=DEPLOYMENT, name="chat")  # a second rollback goes forward again
        assert (forward.version, forward.run) == (2, "good")
        evaluated = llm_atc.evaluate(DEPLOYMENT, run="llm-atc/good", models=["chat"], limit=5)
    assert {p: answer(setup, "chat", p) for p in PROMPTS} == after
    assert evaluated.scores["chat"].chats == 5


def test_promote_refuses_what_it_cannot_do_and_changes_nothing(setup):
    def state():
        with using_home(setup.home):
            from llm_atc.registry import Registry

            record = Registry().find(DEPLOYMENT)
        return sorted(served(setup)), record.details.get("promotions"), record.details.get("adapters")

    before = state()
    for args, message in [
        (["llm-atc/tiny", "--as", "tiny-chat"], "llm-atc/tiny kept no held-out data"),
        (["llm-atc/other", "--as", "chat", "--run", "llm-atc/good"], "was trained on"),
        (["llm-atc/nope", "--as", "chat"], "no training run named 'nope'"),
        (["llm-atc/good", "--as", setup.model], "is the model ev-dep itself serves"),
        (["llm-atc/good", "--as", "chat", "--data", "/nowhere.jsonl"], "--data '/nowhere.jsonl': no such file"),
        (["llm-atc/good", "--as", "chat", "--blue_green"], "--blue_green applies to a full model on a SkyServe"),
    ]:
        assert_one_line_error(cli_in(setup, "promote", *args[:1], "--on", DEPLOYMENT, *args[1:]), message)
        assert state() == before
    rollback = cli_in(setup, "promote", "--rollback", "--on", DEPLOYMENT, "--as", "never-promoted")
    assert_one_line_error(rollback, "no earlier version of 'never-promoted'")
    no_data = cli_in(setup, "eval", DEPLOYMENT)
    assert_one_line_error(no_data, "not a run of llm-atc's: give --data FILE or --run llm-atc/<run>")
    assert state() == before


def test_eval_reads_a_data_file_and_says_what_it_skipped(setup, tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yes"}]}
    data = write_jsonl(tmp_path / "golden.jsonl", mapping_chats(6) + [long])
    result = cli_in(setup, "eval", DEPLOYMENT, "--model", setup.model, "--data", str(data), "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["scores"][setup.model]["chats"] == 6
    assert "skipped 1 conversation(s): longer than the context" in result.stderr
    unknown = cli_in(setup, "eval", DEPLOYMENT, "--model", "nope", "--data", str(data))
    assert_one_line_error(unknown, f"{DEPLOYMENT} serves no model 'nope'")


# --- SkyServe: the one boundary that cannot run here ------------------------------------------------------


def test_a_full_model_on_a_service_is_promoted_by_a_rolling_update(cli, fake_sky, s3, tmp_path, tiny_model):
    """A merged run serving as a SkyServe service: promote hands SkyServe the same task with the candidate's
    checkpoint in place of the current one (rolling; blue-green with the flag), and --rollback hands back the
    previous task."""
    from support.buckets import upload_folder
    from support.sky_boundary import FakeServe
    from support.vllm_setup import VLLM_KEY

    from llm_atc.registry import Record, Registry, Status

    sky = fake_sky()  # its replicas' engine: the session's vLLM server (no scoring here: --force, no score yet)
    sky.serve = FakeServe(sky)
    sky.replica_handle = None
    updates = []
    sky.serve.update = lambda task, service_name, mode: updates.append((task, service_name, mode)) or "request"
    bucket = unique("ckpt")
    s3.create_bucket(Bucket=bucket)
    registry = Registry()
    for run in ("tiny", "merged-b"):  # llm-atc/tiny: a name the session engine answers to
        upload_folder(
            tiny_model, lambda name, path, run=run: s3.upload_file(str(path), bucket, f"llm-atc/{run}/{name}")
        )
        registry.add(Record(name=run, kind="train", model="meta-llama/Llama-2-7b-hf", cluster=f"t-{run}",
                            status=Status.SUCCEEDED, checkpoint_uri=f"s3://{bucket}/llm-atc/{run}"))  # fmt: skip
    held = write_jsonl(tmp_path / "held.jsonl", mapping_chats(4))
    service = unique("svc")
    up = cli("serve", "--name", "llm-atc/tiny", "--accelerator", "L4:1", "--cloud", "aws", "-c", service,
             "--replicas", "2", "-y", "--secret", f"VLLM_API_KEY={VLLM_KEY}", "--secret", "HF_TOKEN=hf-1")  # fmt: skip
    assert up.exit_code == 0, up
    no_token = cli("promote", "llm-atc/merged-b", "--on", service, "--as", "llm-atc/tiny", "--force",
                   "--data", str(held))  # fmt: skip
    assert_one_line_error(no_token, "was started with secret HF_TOKEN: give it again")
    assert updates == []
    done = cli("promote", "llm-atc/merged-b", "--on", service, "--as", "llm-atc/tiny", "--force",
               "--data", str(held), "--secret", "HF_TOKEN=hf-1", "--blue_green")  # fmt: skip
    assert done.exit_code == 0, done
    ((task, name, mode),) = updates
    from sky.serve.serve_utils import UpdateMode

    assert name == service and mode == UpdateMode.BLUE_GREEN
    texts = json.dumps(task.envs) + json.dumps(task.file_mounts or {}, default=str)
    assert f"s3://{bucket}/llm-atc/merged-b" in texts and f"s3://{bucket}/llm-atc/tiny" not in texts
    assert task.envs["SERVED_MODEL_NAME"] == "llm-atc/tiny"  # clients keep calling the same name
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {"VLLM_API_KEY": VLLM_KEY, "HF_TOKEN": "hf-1"}
    assert task.service.min_replicas == 2
    assert Registry().find(service).model == f"s3://{bucket}/llm-atc/merged-b"
    back = cli("promote", "--rollback", "--on", service, "--as", "llm-atc/tiny", "--secret", "HF_TOKEN=hf-1")
    assert back.exit_code == 0, back
    (task_back, _, mode_back) = updates[1]
    assert mode_back == UpdateMode.ROLLING and f"s3://{bucket}/llm-atc/tiny" in json.dumps(task_back.envs)
    assert Registry().find(service).model == f"s3://{bucket}/llm-atc/tiny"
    cli("down", service, "-y")


def test_an_adapter_on_a_service_switches_on_every_replica_in_place(
    fake_sky, vllm_deployment, setup, s3, moto_endpoint, tmp_path
):
    """A SkyServe service with runtime LoRA: the versions go through its manifest, and each replica's follower
    reloads NAME in place (SkyServe's replica here is the session's real vLLM server, with the follower each
    replica runs). Scored token by token: the fake replica says L4 but is vLLM's CPU build with LoRA on."""
    from support.replicas import replica_follower
    from support.sky_boundary import FakeServe
    from support.vllm_setup import VLLM_KEY

    live = vllm_deployment
    sky = fake_sky()
    sky.serve = FakeServe(sky)
    sky.replica_handle = None
    service = unique("svc")
    bound = ("--per_token", "--limit", "5", "--run", "llm-atc/good")
    with using_home(setup.home):
        up = run_cli("serve", "--name", live.model, "--accelerator", "L4:1", "--cloud", "aws", "-c", service,
                     "--replicas", "1", "-y", "--secret", f"VLLM_API_KEY={VLLM_KEY}")  # fmt: skip
        assert up.exit_code == 0, up
        from llm_atc.registry import Registry

        manifest = Registry().find(service).details["adapters_manifest"]
        replica = replica_follower(live, manifest, tmp_path, moto_endpoint)
        try:
            first = run_cli("promote", "llm-atc/noise", "--on", service, "--as", "svc-chat", "--force", *bound)
            assert first.exit_code == 0, first
            before = {p: answer(live, "svc-chat", p) for p in PROMPTS}
            with Caller(live, "svc-chat") as caller:
                second = run_cli("promote", "llm-atc/good", "--on", service, "--as", "svc-chat", "--force", *bound)
            assert second.exit_code == 0, second
            after = {p: answer(live, "svc-chat@v2", p) for p in PROMPTS}
            assert {p: answer(live, "svc-chat", p) for p in PROMPTS} == after  # every replica switched before return
            switched_once(caller, before, after)
            with Caller(live, "svc-chat") as caller:
                back = run_cli("promote", "--rollback", "--on", service, "--as", "svc-chat")
            assert back.exit_code == 0, back
            switched_once(caller, after, before)
        finally:
            replica.terminate()
            replica.wait(10)
            run_cli("down", service, "-y")
            for name in ("svc-chat", "svc-chat@v1", "svc-chat@v2"):
                if name in served(live):
                    live.client().post("/unload_lora_adapter", body={"lora_name": name}, cast_to=object)
