"""recipes/train/finetune.py: data checks, assistant-only masking, and real CPU training runs.

The runs go through ``bash recipes/train/run.sh`` on the tiny model, exactly as a node would run
them, writing to a local folder, to S3 (moto) and to GCS (the emulator).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import unique
from support.paths import BIN, ROOT

TRAIN_DIR = ROOT / "recipes" / "train"
RUN_SH = TRAIN_DIR / "run.sh"
FINISHED = re.compile(r"^llm-atc: training finished: steps=(\d+) train_loss=(\S+) output=(\S+)$", re.M)
RUN_TIMEOUT = 240


def load_finetune():
    """The script as the CLI loads it: by path, with importlib."""
    spec = importlib.util.spec_from_file_location("llm_atc_finetune_test", TRAIN_DIR / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = load_finetune()

WORDS = (
    "the model can train serve cloud cluster token data file run job fine tune help answer "
    "question please thanks you a of to and is it"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_sharegpt(path: Path, n: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = [{"from": "human", "value": sentence(rng, 8)}, {"from": "gpt", "value": sentence(rng, 12)}]
        if i % 2:
            turns += [{"from": "human", "value": sentence(rng, 6)}, {"from": "gpt", "value": sentence(rng, 10)}]
        if i % 4 == 0:
            turns.insert(0, {"from": "system", "value": "You are terse."})
        records.append({"id": f"conv-{i}", "conversations": turns})
    path.write_text(json.dumps(records, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Loading and checking data
# ---------------------------------------------------------------------------------------------


def test_module_top_level_needs_only_the_stdlib(tmp_path):
    """The CLI imports the script where torch & co. are absent."""
    blocked = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "boto3", "google"]
    code = (
        "import sys, importlib.util\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(TRAIN_DIR / 'finetune.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"print(m.summarize(m.load_conversations({str(write_sharegpt(tmp_path / 'd.json', 3))!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'conversations': 3" in out.stdout


def test_load_sharegpt(tmp_path):
    data = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "user", "value": "More?"},
                {"from": "chatgpt", "value": "Sure."},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A"}]},
    ]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(data))
    conversations = ft.load_conversations(str(path))
    assert conversations[0] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Sure."},
    ]
    assert conversations[1] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert ft.summarize(conversations) == {"conversations": 2, "turns": 7, "assistant_turns": 3}


def test_load_openai_jsonl_and_json_list(tmp_path):
    records = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"},
                {"role": "user", "content": "U3"},
                {"role": "assistant", "content": "A3"},
            ]
        },
    ]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    as_list = tmp_path / "chats.json"
    as_list.write_text(json.dumps(records))
    expected = [r["messages"] for r in records]
    assert ft.load_conversations(str(jsonl)) == expected
    assert ft.load_conversations(str(as_list)) == expected
    assert ft.summarize(expected) == {"conversations": 2, "turns": 7, "assistant_turns": 3}


GOOD_JSONL = json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize(
    "name, text, index, fragments",
    [
        ("invalid JSON", '[\n  {"conversations": []},\n  {"conversations": [,]}\n]', 3, ["line 3", "invalid JSON"]),
        (
            "JSONL line 3 invalid",
            f"{GOOD_JSONL}\n{GOOD_JSONL}\n{{not json\n{GOOD_JSONL}\n",
            3,
            ["line 3", "invalid JSON"],
        ),
        (
            "unknown role",
            json.dumps(
                [GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": "u"}, {"from": "robot", "value": "a"}]}]
            ),
            1,
            ["record 1", "turn 1", "'robot'"],
        ),
        (
            "empty value",
            json.dumps(
                [
                    GOOD_SHAREGPT,
                    GOOD_SHAREGPT,
                    GOOD_SHAREGPT,
                    {
                        "conversations": [
                            {"from": "human", "value": "u"},
                            {"from": "gpt", "value": "a"},
                            {"from": "human", "value": "u"},
                            {"from": "gpt", "value": "  "},
                        ]
                    },
                ]
            ),
            3,
            ["record 3: turn 3 ('gpt') has an empty value"],
        ),
        (
            "no assistant turn",
            f"{GOOD_JSONL}\n" + json.dumps({"messages": [{"role": "user", "content": "u"}]}),
            2,
            ["line 2", "no assistant turn"],
        ),
        ("empty file", "  \n\n", 0, ["empty"]),
        (
            "assistant first",
            json.dumps([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "u"}]}]),
            0,
            ["record 0", "before the first user turn"],
        ),
        (
            "system not first",
            json.dumps(
                [
                    GOOD_SHAREGPT,
                    {
                        "conversations": [
                            {"from": "human", "value": "u"},
                            {"from": "system", "value": "s"},
                            {"from": "gpt", "value": "a"},
                        ]
                    },
                ]
            ),
            1,
            ["record 1", "turn 1", "system turn is only allowed first"],
        ),
        ("no turns list", json.dumps([{"id": 1, "text": "hello"}]), 0, ["record 0", "'conversations' or 'messages'"]),
        ("empty list", "[]", 0, ["no conversations"]),
        (
            "non-string content",
            f"{GOOD_JSONL}\n"
            + json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "u"}]},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            2,
            ["line 2", "turn 0", "non-string content"],
        ),
    ],
)
def test_bad_data_names_the_first_bad_record(tmp_path, name, text, index, fragments):
    path = tmp_path / ("data.jsonl" if "JSONL" in name else "data.json")
    path.write_text(text)
    with pytest.raises(ft.DataError) as info:
        ft.load_conversations(str(path))
    assert info.value.index == index, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# Assistant-only masking
# ---------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How do I train a model?"},
    {"role": "assistant", "content": "Run the train job on a cloud cluster."},
    {"role": "user", "content": "And serve it?"},
    {"role": "assistant", "content": "Use the serve command, thanks."},
]


def masked_runs(tokenizer, encoded) -> list[str]:
    """The decoded text of each run of consecutive masked tokens."""
    runs, current = [], []
    for token, flag in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def unmasked_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, f in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if not f])


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_mask_covers_assistant_content_and_eos_only(tokenizer):
    encoded = ft.tokenize_conversation(tokenizer, CONVERSATION, 512)
    assert len(encoded["input_ids"]) == len(encoded["assistant_masks"])
    eos = tokenizer.eos_token
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(tokenizer, encoded) == [text + eos for text in assistant]
    rest = unmasked_text(tokenizer, encoded)
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in rest
    assert "assistant:\n" in rest  # role headers stay out of the loss
    # Same ids and mask as the template's own {% generation %} markers give.
    reference = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert encoded["input_ids"] == list(reference["input_ids"])
    assert encoded["assistant_masks"] == list(reference["assistant_masks"])


def test_mask_with_default_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    encoded = ft.tokenize_conversation(tokenizer, CONVERSATION[1:], 512)
    assert tokenizer.chat_template == ft.DEFAULT_CHAT_TEMPLATE
    runs = masked_runs(tokenizer, encoded)
    assert [run.strip() for run in runs] == [m["content"] + "</s>" for m in CONVERSATION if m["role"] == "assistant"]
    rest = unmasked_text(tokenizer, encoded)
    assert "USER: How do I train a model?" in rest and "USER: And serve it?" in rest
    assert rest.count("ASSISTANT:") == 2 and "curious user" in rest  # Vicuna's default system prompt
    assert not any("USER" in run or "ASSISTANT" in run for run in runs)
    # a system message replaces the default system prompt
    with_system = ft.tokenize_conversation(tokenizer, CONVERSATION, 512)
    assert "Answer briefly." in unmasked_text(tokenizer, with_system)
    assert "curious user" not in unmasked_text(tokenizer, with_system)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_mask_with_a_chatml_template(tiny_model):
    """No {% generation %} markers, an end-of-turn token other than eos, a newline after it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    encoded = ft.tokenize_conversation(tokenizer, CONVERSATION, 512)
    runs = masked_runs(tokenizer, encoded)
    assert runs == [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert tokenizer.decode(encoded["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_mask_truncates(tokenizer):
    encoded = ft.tokenize_conversation(tokenizer, CONVERSATION, 20)
    assert len(encoded["input_ids"]) == len(encoded["assistant_masks"]) == 20


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_config_defaults():
    config = ft.read_config({"DATA": "s3://b/d.json", "MODEL_TYPE": "full"})
    assert (config.model_type, config.lr, config.max_seq_len, config.epochs) == ("full", 2e-5, 2048, 3.0)
    assert (config.batch_size, config.grad_accum, config.max_steps, config.save_steps) == (4, 1, -1, 200)
    assert config.base_model == "meta-llama/Llama-2-7b-hf" and config.merge and not config.wandb
    lora = ft.read_config({"DATA": "d.json", "MERGE": "0", "LR": "", "WANDB_API_KEY": "k"})
    assert (lora.model_type, lora.lr, lora.merge, lora.wandb, lora.lora_r, lora.lora_alpha) == (
        "lora",
        2e-4,
        False,
        True,
        16,
        32,
    )
    with pytest.raises(ft.SettingError, match="DATA is not set"):
        ft.read_config({})
    with pytest.raises(ft.SettingError, match="MAX_STEPS='four' is not a whole number"):
        ft.read_config({"DATA": "d.json", "MAX_STEPS": "four"})


def test_qlora_model_setup():
    import torch

    config = ft.read_config({"DATA": "d.json", "MODEL_TYPE": "qlora", "LORA_R": "64", "LORA_ALPHA": "16"})
    kwargs, peft_config = ft.model_setup(config, cuda=True, bf16=True, local_rank=1)
    quant = kwargs["quantization_config"]
    assert quant.load_in_4bit and not quant.load_in_8bit
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["dtype"] == torch.bfloat16
    assert kwargs["device_map"] == {"": 1}
    assert peft_config.r == 64 and peft_config.lora_alpha == 16 and peft_config.lora_dropout == 0.05
    assert peft_config.target_modules == "all-linear" and peft_config.task_type == "CAUSAL_LM"

    lora_kwargs, lora_peft = ft.model_setup(ft.read_config({"DATA": "d.json"}), cuda=False)
    assert lora_kwargs == {"dtype": torch.float32} and lora_peft.r == 16
    full_kwargs, full_peft = ft.model_setup(
        ft.read_config({"DATA": "d.json", "MODEL_TYPE": "full"}), cuda=True, world_size=8
    )
    assert full_kwargs == {"dtype": torch.float32} and full_peft is None  # FSDP keeps fp32 master weights
    single, _ = ft.model_setup(ft.read_config({"DATA": "d.json", "MODEL_TYPE": "full"}), cuda=True)
    assert single == {"dtype": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Real training runs (CPU, tiny model) through run.sh
# ---------------------------------------------------------------------------------------------


def train_env(tiny_model, data, output, work, **overrides) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SKYPILOT_", "WANDB_", "PYTEST_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        {
            "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MODEL_TYPE": "lora",
            "MODEL_BASE": str(tiny_model),
            "DATA": str(data),
            "OUTPUT_URI": str(output),
            "WORK_DIR": str(work),
            "MAX_STEPS": "4",
            "MAX_SEQ_LEN": "128",
            "BATCH_SIZE": "2",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start(env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen(
            ["bash", str(RUN_SH)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def finish(process: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail(f"training did not finish in {timeout}s:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


def run_train(env: dict, log: Path) -> str:
    code, text = finish(start(env, log), log)
    assert code == 0, text[-6000:]
    return text


def finished(text: str) -> tuple[int, float, str]:
    match = FINISHED.search(text)
    assert match, text[-6000:]
    steps, loss, output = int(match.group(1)), float(match.group(2)), match.group(3)
    assert math.isfinite(loss), text[-3000:]
    return steps, loss, output


def wait_until(
    predicate, process: subprocess.Popen, log: Path, what: str, timeout: float = 150, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(interval)
    stop(process)
    pytest.fail(f"no {what} within {timeout}s:\n{log.read_text()[-4000:]}")


def check_generates(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Train a model"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.fixture(scope="module")
def local_runs(tiny_model, tmp_path_factory):
    """full, lora (merged) and lora (MERGE=0) runs into local folders, side by side."""
    root = tmp_path_factory.mktemp("local-runs")
    data = write_sharegpt(root / "chats.json")
    variants = {
        "full": {"MODEL_TYPE": "full"},
        "lora": {"MODEL_TYPE": "lora"},
        "adapter": {"MODEL_TYPE": "lora", "MERGE": "0"},
    }
    processes = {}
    for name, overrides in variants.items():
        env = train_env(tiny_model, data, root / name / "out", root / name / "work", OMP_NUM_THREADS=1, **overrides)
        processes[name] = (start(env, root / f"{name}.log"), root / f"{name}.log")
    results = {}
    try:
        for name, (process, log) in processes.items():
            code, text = finish(process, log)
            results[name] = (code, text, root / name / "out", root / name / "work")
    finally:
        for process, _ in processes.values():
            stop(process)
    return results


def check_run(result, *, expect_config: bool):
    code, text, out, work = result
    assert code == 0, text[-6000:]
    steps, loss, output = finished(text)
    assert steps == 4 and output == str(out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    info = json.loads((out / "llm-atc.json").read_text())
    assert info["steps"] == 4 and math.isclose(info["train_loss"], loss, abs_tol=1e-4)
    assert (out / "config.json").is_file() == expect_config
    assert "Traceback" not in text
    return info, text


def test_full_run(local_runs, tiny_model):
    info, text = check_run(local_runs["full"], expect_config=True)
    assert info == {**info, "model_type": "full", "base_model": str(tiny_model), "merged": True}
    assert "{'loss'" in text and "steps/s" in text  # one log line per step
    check_generates(local_runs["full"][2])


def test_lora_run_merged(local_runs, tiny_model):
    info, text = check_run(local_runs["lora"], expect_config=True)
    assert info == {**info, "model_type": "lora", "base_model": str(tiny_model), "merged": True}
    out = local_runs["lora"][2]
    assert not (out / "adapter_config.json").exists()
    assert "LoRA r=16 alpha=32" in text
    check_generates(out)
    # the merge changed the weights: the model is not the base
    from safetensors.torch import load_file

    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    changed = [k for k in base if "proj" in k and not (merged[k] == base[k]).all()]
    assert changed


def test_lora_adapter_only(local_runs, tiny_model):
    info, _ = check_run(local_runs["adapter"], expect_config=False)
    assert info["merged"] is False and info["model_type"] == "lora"
    out = local_runs["adapter"][2]
    adapter = json.loads((out / "adapter_config.json").read_text())
    # The base was a folder on the node: the run carries a copy of it, so it can be served anywhere.
    assert adapter["base_model_name_or_path"] == "base" and info["base_model"] == "base"
    assert (out / "base" / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert adapter["r"] == 16 and (out / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    assert model.peft_config["default"].r == 16


# A tiny-model micro-batch takes ~10 ms on CPU; the kill tests make each optimizer step 48
# micro-batches, so the run is still short of checkpoint-6 (seconds away; checkpoint-4 is fine too)
# when the test sees checkpoint-2 and kills it.
RESUME_CONVERSATIONS = 96
RESUME_GRAD_ACCUM = 48


def test_resume_after_kill(tiny_model, tmp_path):
    data = write_sharegpt(tmp_path / "chats.json", RESUME_CONVERSATIONS)
    work, out = tmp_path / "work", tmp_path / "out"
    env = train_env(
        tiny_model, data, out, work, MODEL_TYPE="lora", SAVE_STEPS=2, MAX_STEPS=6, GRAD_ACCUM=RESUME_GRAD_ACCUM
    )
    log = tmp_path / "first.log"
    process = start(env, log)
    try:
        wait_until(
            lambda: (work / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file(),
            process,
            log,
            "checkpoint-2",
        )
    finally:
        stop(process)  # SIGTERM to the group, as a preempted node would die
    assert not FINISHED.search(log.read_text())
    latest = ft.latest_local_checkpoint(work / "checkpoints")
    assert latest is not None and ft._step(latest.name) < 6

    text = run_train(env, tmp_path / "second.log")
    assert f"llm-atc: resuming from {latest}" in text
    steps, _, _ = finished(text)
    assert steps == 6
    assert json.loads((out / "llm-atc.json").read_text())["steps"] == 6
    assert (out / "config.json").is_file()


def test_s3_data_output_and_remote_resume(tiny_model, tmp_path, s3):
    bucket = unique("ft-s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(write_sharegpt(tmp_path / "chats.json", RESUME_CONVERSATIONS)), bucket, "data/chats.json")
    output = f"s3://{bucket}/llm-atc/run1"
    work = tmp_path / "work"
    env = train_env(
        tiny_model,
        f"s3://{bucket}/data/chats.json",
        output,
        work,
        MODEL_TYPE="full",
        SAVE_STEPS=2,
        MAX_STEPS=6,
        GRAD_ACCUM=RESUME_GRAD_ACCUM,
    )

    def keys(prefix="llm-atc/run1/"):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def uploaded_steps():
        return sorted(
            ft._step(k.split("/")[3]) for k in keys("llm-atc/run1/checkpoints/") if k.endswith("/" + ft.UPLOADED_MARKER)
        )

    log = tmp_path / "first.log"
    process = start(env, log)
    try:
        wait_until(
            lambda: "llm-atc: uploaded checkpoint-2 " in log.read_text(), process, log, "an uploaded checkpoint-2"
        )
    finally:
        stop(process)
    assert not FINISHED.search(log.read_text())
    assert 2 in uploaded_steps()
    newest = max(uploaded_steps())
    assert newest < 6
    shutil.rmtree(work)  # a fresh VM: nothing local

    text = run_train(env, tmp_path / "second.log")
    assert f"downloaded checkpoint-{newest}" in text
    assert f"llm-atc: resuming from {work / 'checkpoints' / f'checkpoint-{newest}'}" in text
    steps, _, uri = finished(text)
    assert steps == 6 and uri == output
    remaining = keys()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm-atc.json"):
        assert f"llm-atc/run1/{name}" in remaining
    assert not [k for k in remaining if k.startswith("llm-atc/run1/checkpoints/")]
    info = json.loads(s3.get_object(Bucket=bucket, Key="llm-atc/run1/llm-atc.json")["Body"].read())
    assert info["steps"] == 6 and info["model_type"] == "full"


def test_gcs_data_and_output(tiny_model, tmp_path, gcs):
    bucket = gcs.create_bucket(unique("ft-gcs"))
    bucket.blob("data/chats.json").upload_from_filename(str(write_sharegpt(tmp_path / "chats.json")))
    output = f"gs://{bucket.name}/llm-atc/run1"
    env = train_env(
        tiny_model,
        f"gs://{bucket.name}/data/chats.json",
        output,
        tmp_path / "work",
        MODEL_TYPE="lora",
        MAX_STEPS=2,
        SAVE_STEPS=1,
    )
    text = run_train(env, tmp_path / "train.log")
    assert "uploaded checkpoint-1" in text  # the intermediate checkpoint went to the bucket ...
    steps, _, uri = finished(text)
    assert steps == 2 and uri == output
    names = [blob.name for blob in gcs.list_blobs(bucket.name, prefix="llm-atc/run1/")]
    assert "llm-atc/run1/config.json" in names and "llm-atc/run1/llm-atc.json" in names
    assert not [n for n in names if n.startswith("llm-atc/run1/checkpoints/")]  # ... and is gone at the end
    assert "deleted" in text


def test_qlora_needs_cuda(tiny_model, tmp_path):
    data = write_sharegpt(tmp_path / "chats.json", 2)
    env = train_env(tiny_model, data, tmp_path / "out", tmp_path / "work", MODEL_TYPE="qlora")
    code, text = finish(start(env, tmp_path / "qlora.log"), tmp_path / "qlora.log", timeout=120)
    assert code != 0
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[-1].startswith("qlora needs a CUDA GPU: "), text
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()
