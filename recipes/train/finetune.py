"""Fine-tune a causal LM on chat data with TRL: full (Vicuna style), LoRA or QLoRA.

Run on the node by ``run.sh`` (``python3 finetune.py``, or ``torchrun ... finetune.py``
across GPUs and nodes); configured by environment variables (see :func:`read_config`):

    MODEL_TYPE=lora MODEL_BASE=meta-llama/Llama-2-7b-hf DATA=s3://bucket/chats.json \\
        OUTPUT_URI=s3://bucket/llm-atc/my-run python3 finetune.py

What it does:

* reads the data (Vicuna/ShareGPT JSON, or OpenAI-style ``{"messages": [...]}`` JSONL / JSON),
  from a local path, ``s3://`` or ``gs://``, and checks every record;
* tokenizes each conversation with the model's chat template, training only on the
  assistant turns (their content and end-of-turn token), and hands the pre-tokenized
  ``input_ids`` / ``assistant_masks`` dataset to TRL's ``SFTTrainer``;
* checkpoints every ``SAVE_STEPS`` into ``WORK_DIR/checkpoints`` and mirrors each checkpoint to
  ``<OUTPUT_URI>/checkpoints/`` when OUTPUT_URI is a bucket, and resumes from the newest local
  or uploaded checkpoint, so a preempted spot VM picks up where it stopped;
* writes a servable model (full weights, LoRA merged into the base, or the adapter alone) with
  its tokenizer and ``llm-atc.json`` to the top of OUTPUT_URI, and prints
  ``llm-atc: training finished: steps=N train_loss=X output=URI``.

The module's top level imports only the standard library: the ``llm-atc`` CLI imports it to
check data files (:func:`load_conversations`) on machines without torch.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

try:  # imported from the llm-atc package (the CLI checks data with this very code)
    from .buckets import Bucket, is_bucket_uri
    from .contract import DEFAULT_EVAL_FRACTION, FINISHED_MARKER, HELD_OUT_FILE, MODEL_TYPES, RUN_BASE
except ImportError:  # run as a script on the node, next to buckets.py and contract.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from buckets import Bucket, is_bucket_uri  # stdlib-only at import time
    from contract import DEFAULT_EVAL_FRACTION, FINISHED_MARKER, HELD_OUT_FILE, MODEL_TYPES, RUN_BASE

CHECKPOINTS = "checkpoints"
UPLOADED_MARKER = ".llm-atc-uploaded"  # written last into an uploaded checkpoint: the upload is complete

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = ("system", "user", "assistant")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Vicuna v1.1 (FastChat): "<s>SYSTEM USER: hi ASSISTANT: hello</s>USER: ... ASSISTANT:"
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    '{{ "' + VICUNA_SYSTEM + ' " }}{% set loop_messages = messages %}'
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + (eos_token or '') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# End-of-turn markers of common chat templates; the assistant's mask ends with the first one after its content.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def log(message: str) -> None:
    """One ``llm-atc:`` line on stdout (main process only)."""
    if _is_main_process():
        print(f"llm-atc: {message}", flush=True)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------------------------
# Data: load and check
# --------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A bad data file. ``index`` is the 0-based record index (JSON) or the 1-based line number
    (JSONL, and JSON syntax errors); the message says which ("record 3: ..." / "line 3: ...")."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def load_conversations(path: str) -> list[list[dict]]:
    """Read a data file and return its conversations as ``[{"role", "content"}, ...]`` lists.

    Accepts Vicuna/ShareGPT JSON (a list of ``{"conversations": [{"from", "value"}]}``),
    OpenAI-style JSONL (one ``{"messages": [{"role", "content"}]}`` per line) and a JSON list of
    such ``{"messages": ...}`` objects. Raises :class:`DataError` on the first bad record.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(0, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DataError(0, "the file is empty: expected a JSON list of conversations or JSONL records")

    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            line = exc.lineno + text[: len(text) - len(stripped)].count("\n")
            raise DataError(line, f"line {line}: invalid JSON (column {exc.colno}): {exc.msg}") from None
        if not records:
            raise DataError(0, "the file holds an empty list: no conversations")
        return [_normalise(record, f"record {i}", i) for i, record in enumerate(records)]

    if stripped.startswith("{"):
        try:  # a single (possibly pretty-printed) JSON object
            record = json.loads(stripped)
        except json.JSONDecodeError:
            pass
        else:
            return [_normalise(record, "record 0", 0)]
        conversations = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip().lstrip("\ufeff")
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(number, f"line {number}: invalid JSON (column {exc.colno}): {exc.msg}") from None
            conversations.append(_normalise(record, f"line {number}", number))
        return conversations

    first = next(n for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    raise DataError(first, f"line {first}: not JSON: expected a JSON list of conversations or JSONL records")


def _normalise(record, where: str, index: int) -> list[dict]:
    def fail(message: str):
        raise DataError(index, f"{where}: {message}")

    if not isinstance(record, dict):
        fail(f"expected an object with a 'conversations' or 'messages' list, got {type(record).__name__}")
    if isinstance(record.get("conversations"), list):
        turns, role_key, content_key, roles = record["conversations"], "from", "value", ROLES
    elif isinstance(record.get("messages"), list):
        turns, role_key, content_key, roles = (
            record["messages"],
            "role",
            "content",
            dict(zip(OPENAI_ROLES, OPENAI_ROLES, strict=True)),
        )
    else:
        fail("has no 'conversations' or 'messages' list")
    if not turns:
        fail("has no turns")

    messages, seen_user, seen_assistant = [], False, False
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            fail(f"turn {t} is not an object")
        raw_role = turn.get(role_key)
        if raw_role not in roles:
            known = ", ".join(repr(r) for r in roles)
            fail(f"turn {t} has an unknown {role_key!r} {raw_role!r} (expected one of {known})")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            what = "an empty" if content is None or isinstance(content, str) else "a non-string"
            fail(f"turn {t} ({raw_role!r}) has {what} {content_key}")
        role = roles[raw_role]
        if role == "system" and t != 0:
            fail(f"turn {t} ({raw_role!r}): a system turn is only allowed first")
        if role == "assistant" and not seen_user:
            fail(f"turn {t} ({raw_role!r}): an assistant turn comes before the first user turn")
        seen_user |= role == "user"
        seen_assistant |= role == "assistant"
        messages.append({"role": role, "content": content})
    if not seen_assistant:
        fail("has no assistant turn")
    return messages


def is_held_out(messages: list[dict], fraction: float) -> bool:
    """Whether a conversation belongs to the held-out share: decided by a hash of its messages alone, so the
    split is the same on every rerun, rank and machine, and copies of one conversation fall on one side."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") < fraction * 2**64


def split_held_out(conversations: list[list[dict]], fraction: float) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training, held out): about ``fraction`` of the conversations held out, never the same ones as training.
    Nothing is held out when that would leave nothing to train on."""
    held = [c for c in conversations if is_held_out(c, fraction)]
    if len(held) == len(conversations):
        return conversations, []
    return [c for c in conversations if not is_held_out(c, fraction)], held


def write_conversations(path: Path, conversations: list[list[dict]]) -> None:
    """Conversations as OpenAI messages JSONL."""
    with path.open("w", encoding="utf-8") as out:
        for messages in conversations:
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def summarize(conversations: list[list[dict]]) -> dict:
    """Counts for a progress line: conversations, turns and assistant turns."""
    return {
        "conversations": len(conversations),
        "turns": sum(len(c) for c in conversations),
        "assistant_turns": sum(1 for c in conversations for m in c if m["role"] == "assistant"),
    }


# --------------------------------------------------------------------------------------------
# Tokenization with an assistant-only loss mask
# --------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the Vicuna v1.1 one; True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> dict:
    """Token ids of a rendered conversation and a mask that is 1 on what the assistant says.

    The chat template is rendered incrementally: for each assistant turn ``i``, the text of
    ``messages[:i]`` with the generation prompt, then the text of ``messages[:i+1]``; what the
    second adds to the first is the assistant's answer. Each piece is tokenized on its own, so the
    mask covers the answer (and its end-of-turn / eos token) and never a role header or user or
    system text. Works for any template whose renderings are prefix-consistent; no
    ``{% generation %}`` markers needed. The result is truncated to ``max_len`` tokens.
    """
    ensure_chat_template(tokenizer)
    stops = _stop_strings(tokenizer)
    input_ids: list[int] = []
    masks: list[int] = []

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def add(text: str, flag: int) -> None:
        if text:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            masks.extend([flag] * len(ids))

    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently (the text for the first "
                f"{i} messages plus the generation prompt is not a prefix of the text for {i + 1}); set a "
                "template that does (tokenizer.chat_template)"
            )
        add(prompt[len(rendered) :], 0)
        answer = full[len(prompt) :]
        end = _answer_end(answer, message["content"], stops)
        add(answer[:end], 1)
        add(answer[end:], 0)
        rendered = full
        if len(input_ids) >= max_len:
            break
    else:
        add(render(messages, False)[len(rendered) :], 0)
    return {"input_ids": input_ids[:max_len], "assistant_masks": masks[:max_len]}


def _stop_strings(tokenizer) -> list[str]:
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    vocab = tokenizer.get_vocab()
    stops += [token for token in END_OF_TURN_TOKENS if token in vocab and token not in stops]
    return stops


def _answer_end(answer: str, content: str, stops: list[str]) -> int:
    """Where the trained part of an assistant segment ends: after the first end-of-turn token that
    follows the content; without one, before the trailing whitespace."""
    start = answer.find(content)
    if start < 0:
        start = max(answer.find(content.strip()), 0)
        content = content.strip()
    after = start + len(content)
    found = [(answer.find(stop, after), stop) for stop in stops]
    found = [(position, stop) for position, stop in found if position >= 0]
    if found:
        position, stop = min(found)
        return position + len(stop)
    return len(answer.rstrip())


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class Config:
    """A run's settings (see :func:`read_config`). A plain class, not a dataclass: the CLI execs
    this file without registering it in ``sys.modules``, which dataclasses need."""

    model_type = "lora"
    base_model = "meta-llama/Llama-2-7b-hf"
    data = ""
    output_uri = ""
    work_dir = "~/llm-atc-work"
    max_seq_len = 2048
    epochs = 3.0
    lr = 2e-4
    batch_size = 4
    grad_accum = 1
    max_steps = -1
    save_steps = 200
    max_hours = 0.0  # 0: no time limit
    eval_fraction = DEFAULT_EVAL_FRACTION  # the share of conversations held out (HELD_OUT_FILE in the output)
    lora_r = 16
    lora_alpha = 32
    lora_dropout = 0.05
    merge = True
    seed = 42
    wandb = False
    wandb_project = ""

    def __init__(self, **settings):
        for name, value in settings.items():
            if not hasattr(type(self), name):
                raise TypeError(f"unknown setting {name!r}")
            setattr(self, name, value)

    def __repr__(self) -> str:
        names = [
            n
            for n in vars(type(self))
            if not n.startswith("_")
            and not callable(getattr(type(self), n))
            and not isinstance(getattr(type(self), n), property)
        ]
        return "Config(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    @property
    def peft(self) -> bool:
        return self.model_type in ("lora", "qlora")

    @property
    def work(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    @property
    def checkpoints(self) -> Path:
        return self.work / CHECKPOINTS


def _expand_home(value: str) -> str:
    return os.path.expanduser(value) if value.startswith("~/") else value


class SettingError(ValueError):
    """A training setting (an environment variable of the recipe) that is not a valid value."""


# Each numeric training setting: its type and the range it must be in ((low, high): inclusive, None: open).
SETTINGS = {
    "MAX_SEQ_LEN": (int, 1, 1_048_576),
    "EPOCHS": (float, 1e-6, 10_000),
    "LR": (float, 1e-12, 1.0),
    "BATCH_SIZE": (int, 1, 65_536),
    "GRAD_ACCUM": (int, 1, 65_536),
    "MAX_STEPS": (int, -1, 10_000_000),
    "SAVE_STEPS": (int, 1, 10_000_000),
    "LORA_R": (int, 1, 4096),
    "LORA_ALPHA": (int, 1, 65_536),
    "LORA_DROPOUT": (float, 0.0, 0.99),
    "SEED": (int, 0, 2**32 - 1),
    "MAX_HOURS": (float, 0.01, 8760),  # set by llm-atc from train --max_hours
    "EVAL_FRACTION": (float, 0.0, 0.5),  # the share of conversations held out of training (train --eval_fraction)
}
TIME_LIMIT_MARKER = "llm-atc: stopped: time limit of"  # + " H hours reached at step N ..."


def read_config(env=None) -> Config:
    """The run's settings from environment variables (empty values mean the default); a SettingError
    names the first that is not a number of its kind in its range."""
    import math

    env = os.environ if env is None else env

    def get(name, default, kind=str):
        raw = str(env.get(name) or "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise SettingError(f"{name}={raw[:40]!r} is not {what}") from None
        if name in SETTINGS:
            _, low, high = SETTINGS[name]
            if name == "MAX_STEPS" and value == 0:
                raise SettingError("MAX_STEPS=0: give -1 (train for EPOCHS) or a number of steps from 1")
            if not math.isfinite(value) or not low <= value <= high:
                raise SettingError(f"{name}={raw[:40]} must be from {low:g} to {high:g}")
        return value

    model_type = get("MODEL_TYPE", "lora").lower()
    if model_type == "vicuna":
        model_type = "full"
    if model_type not in MODEL_TYPES.values():
        raise SettingError(f"MODEL_TYPE={model_type!r} must be one of {', '.join(MODEL_TYPES.values())}")
    work_dir = get("WORK_DIR", "~/llm-atc-work")
    config = Config(
        model_type=model_type,
        # "~/..." is a folder on the node (llm-atc syncs a local base model there).
        base_model=_expand_home(get("MODEL_BASE", Config.base_model)),
        data=get("DATA", ""),
        output_uri=get("OUTPUT_URI", ""),
        work_dir=work_dir,
        max_seq_len=get("MAX_SEQ_LEN", 2048, int),
        epochs=get("EPOCHS", 3.0, float),
        lr=get("LR", 2e-5 if model_type == "full" else 2e-4, float),
        batch_size=get("BATCH_SIZE", 4, int),
        grad_accum=get("GRAD_ACCUM", 1, int),
        max_steps=get("MAX_STEPS", -1, int),
        save_steps=get("SAVE_STEPS", 200, int),
        lora_r=get("LORA_R", 16, int),
        lora_alpha=get("LORA_ALPHA", 32, int),
        lora_dropout=get("LORA_DROPOUT", 0.05, float),
        merge=get("MERGE", "1").lower() not in ("0", "false", "no", "off"),
        seed=get("SEED", 42, int),
        max_hours=get("MAX_HOURS", 0.0, float),
        eval_fraction=get("EVAL_FRACTION", DEFAULT_EVAL_FRACTION, float),
        wandb=bool(get("WANDB_API_KEY", "")),
        wandb_project=get("WANDB_PROJECT", ""),
    )
    if not config.data:
        raise SettingError("DATA is not set: give the training data as a local path, s3://... or gs://...")
    if not config.output_uri:
        config.output_uri = str(config.work / "output")
    return config


def fetch_data(config: Config) -> Path:
    """A local copy of DATA (downloaded once into WORK_DIR/data when it is a bucket URI)."""
    if not is_bucket_uri(config.data):
        path = Path(config.data).expanduser()
        if not path.is_file():
            raise SystemExit(f"llm-atc: DATA {config.data!r}: no such file")
        return path
    source = Bucket(config.data)
    dest = config.work / "data" / (Path(source.prefix).name or "data.json")
    if not dest.is_file():
        log(f"downloading {config.data}")
        partial = dest.with_name(dest.name + ".partial")
        try:
            parent = Bucket(f"{source.scheme}://{source.bucket}")
            parent.download_file(source.prefix, partial)
        except Exception as exc:
            raise SystemExit(f"llm-atc: cannot download DATA {config.data}: {exc}") from None
        partial.replace(dest)
    return dest


# --------------------------------------------------------------------------------------------
# Checkpoints: find, download, mirror
# --------------------------------------------------------------------------------------------


def _step(name: str) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", name)
    return int(match.group(1)) if match else -1


def latest_local_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` (its trainer_state.json, written last, is there)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _step(p.name) >= 0 and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: _step(p.name), default=None)


def latest_remote_checkpoint(remote: Bucket) -> str | None:
    """The newest ``checkpoint-N`` under ``remote`` whose upload finished."""
    names = {key.split("/", 1)[0] for key in remote.list() if key.endswith("/" + UPLOADED_MARKER)}
    names = [n for n in names if _step(n) >= 0]
    return max(names, key=_step, default=None)


def download_checkpoint(remote: Bucket, name: str, folder: Path) -> Path:
    dest = folder / name
    partial = folder / f".download-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    count = remote.child(name).download_folder(partial)
    (partial / UPLOADED_MARKER).unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    log(f"downloaded {name} ({count} files) from {remote.child(name)}")
    return dest


def resume_checkpoint(config: Config, args) -> str | None:
    """The checkpoint to resume from: the newest in WORK_DIR/checkpoints, else the newest uploaded
    to ``<OUTPUT_URI>/checkpoints/`` (downloaded). Every node ends up with the same one."""
    import torch.distributed as dist

    remote = Bucket(config.output_uri).child(CHECKPOINTS) if is_bucket_uri(config.output_uri) else None
    multi_node = int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    name = None
    if args.process_index == 0:
        if multi_node and remote is not None:
            name = latest_remote_checkpoint(remote)  # what every node can download
        else:
            local = latest_local_checkpoint(config.checkpoints)
            name = local.name if local else None
            if name is None and remote is not None:
                name = latest_remote_checkpoint(remote)
    if dist.is_available() and dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    if name is None:
        return None
    with args.main_process_first(local=True, desc="checkpoint download"):
        if args.local_process_index == 0 and not (config.checkpoints / name / "trainer_state.json").is_file():
            if remote is None:
                raise SystemExit(f"llm-atc: checkpoint {name} is not on this node and OUTPUT_URI is not a bucket")
            download_checkpoint(remote, name, config.checkpoints)
    path = config.checkpoints / name
    log(f"resuming from {path}")
    return str(path)


def make_upload_callback(config: Config):
    """A TrainerCallback that mirrors each saved checkpoint to ``<OUTPUT_URI>/checkpoints/<name>/``."""
    from transformers import TrainerCallback

    remote = Bucket(config.output_uri).child(CHECKPOINTS)

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if state.max_steps and state.global_step >= state.max_steps:
                return  # the last step: the final model is written next, the checkpoints deleted
            name = f"checkpoint-{state.global_step}"
            folder = Path(args.output_dir) / name
            if not folder.is_dir():
                return
            start = time.monotonic()
            marker = folder / UPLOADED_MARKER
            try:
                marker.write_text(json.dumps({"step": state.global_step, "time": time.time()}))
                count = remote.child(name).upload_folder(folder, last=(UPLOADED_MARKER,))
                # Mirror the local rotation (save_total_limit): drop uploaded checkpoints no longer kept here.
                kept = {p.name for p in Path(args.output_dir).iterdir() if _step(p.name) >= 0}
                for old in {key.split("/", 1)[0] for key in remote.list()} - kept:
                    if _step(old) >= 0:
                        remote.child(old).delete()
            except Exception as exc:
                log(f"warning: could not upload {name} to {remote.child(name)}: {exc}")
                return
            finally:
                marker.unlink(missing_ok=True)
            log(f"uploaded {name} ({count} files) to {remote.child(name)} in {time.monotonic() - start:.1f}s")

    return UploadCheckpoints()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def compute_dtype(cuda: bool):
    """bf16 on CUDA (fp16 on GPUs without bf16), float32 on CPU."""
    import torch

    if not cuda:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def model_setup(config: Config, *, cuda: bool, bf16: bool = True, world_size: int = 1, local_rank: int = 0):
    """``from_pretrained`` keyword arguments and the PEFT config for a run (loads nothing).

    full: bf16 weights on one GPU; float32 master weights under FSDP (which computes in bf16) and
    with fp16 AMP; lora: the base in bf16 (float32 on CPU) plus a LoRA adapter on every linear
    projection; qlora: the base quantized to 4-bit NF4 with double quantization, computing in bf16.
    """
    import torch

    dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    if config.model_type == "full" and (world_size > 1 or dtype == torch.float16):
        dtype = torch.float32
    kwargs = {"dtype": dtype}
    peft_config = None
    if config.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )
    if config.model_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float16  # the non-quantized layers
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": local_rank}
    return kwargs, peft_config


def check_qlora(config: Config) -> None:
    """QLoRA needs CUDA and bitsandbytes: say so in one line before anything is downloaded."""
    if config.model_type != "qlora":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "qlora needs a CUDA GPU: no CUDA device is visible on this machine (torch.cuda.is_available() is "
            "False); launch on a GPU, or use MODEL_TYPE=lora"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("qlora needs bitsandbytes: run setup.sh with MODEL_TYPE=qlora (pip install bitsandbytes)")


def load_model(config: Config, *, cuda: bool, world_size: int, local_rank: int):
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = cuda and torch.cuda.is_bf16_supported()
    kwargs, peft_config = model_setup(config, cuda=cuda, bf16=bf16, world_size=world_size, local_rank=local_rank)
    model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    if config.model_type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, peft_config


def build_dataset(tokenizer, conversations: list[list[dict]], max_len: int):
    """A ``datasets.Dataset`` of ``input_ids`` / ``assistant_masks``, dropping conversations whose
    assistant turns all fall beyond ``max_len``."""
    from datasets import Dataset

    rows = [tokenize_conversation(tokenizer, messages, max_len) for messages in conversations]
    kept = [row for row in rows if any(row["assistant_masks"])]
    if len(kept) < len(rows):
        log(f"dropped {len(rows) - len(kept)} conversations with no assistant tokens within MAX_SEQ_LEN={max_len}")
    if not kept:
        raise SystemExit(f"llm-atc: no conversation has an assistant turn within MAX_SEQ_LEN={max_len} tokens")
    tokens = sum(len(row["input_ids"]) for row in kept)
    trained = sum(sum(row["assistant_masks"]) for row in kept)
    log(f"tokenized {len(kept)} conversations: {tokens} tokens, {trained} of them trained on (assistant)")
    return Dataset.from_list(kept)


def training_args(config: Config, *, cuda: bool, world_size: int):
    """TRL's SFTConfig for the run."""
    import torch
    from trl import SFTConfig

    fsdp = config.model_type == "full" and world_size > 1 and cuda
    bf16 = cuda and torch.cuda.is_bf16_supported()
    fp16 = cuda and not bf16
    return SFTConfig(
        output_dir=str(config.checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        # The dataset is pre-tokenized: TRL turns `assistant_masks` into labels (-100 elsewhere) and truncates.
        max_length=config.max_seq_len,
        packing=False,
        assistant_only_loss=False,
        gradient_checkpointing=cuda and not fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cuda and not fsdp else None,
        fsdp=True if fsdp else None,
        fsdp_config={
            "version": 2,
            "reshard_after_forward": True,  # full_shard
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's decoder layers
            "activation_checkpointing": True,
            "state_dict_type": "FULL_STATE_DICT",  # rank 0 writes whole checkpoints: uploadable, resumable
        }
        if fsdp
        else None,
        ddp_timeout=7200,  # rank 0 uploads checkpoints while the others wait
        dataloader_num_workers=0,
        torch_compile=False,
        disable_tqdm=True,  # one log line per step instead of a progress bar in the job log
        report_to=["wandb"] if config.wandb else "none",
        run_name=os.environ.get("SKYPILOT_TASK_ID") or None,
    )


# --------------------------------------------------------------------------------------------
# Final output
# --------------------------------------------------------------------------------------------


def merge_adapter(config: Config, adapter_dir: Path, out_dir: Path) -> None:
    """Reload the base in 16-bit (float32 on CPU), merge the adapter into it, save full weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log(f"merging the adapter into {config.base_model}")
    base = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=compute_dtype(torch.cuda.is_available()))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    del base, merged
    gc.collect()


def publish(local: Path, output_uri: str) -> None:
    """Put the final model at the top of OUTPUT_URI; on a bucket, delete its checkpoints."""
    if is_bucket_uri(output_uri):
        target = Bucket(output_uri)
        count = target.upload_folder(local, last=("llm-atc.json",))
        log(f"uploaded the model ({count} files) to {target}")
        removed = target.child(CHECKPOINTS).delete()
        if removed:
            log(f"deleted {removed} checkpoint files under {target.child(CHECKPOINTS)}")
        return
    dest = Path(output_uri).expanduser()
    if dest.resolve() != local.resolve():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dest, dirs_exist_ok=True)
    log(f"wrote the model to {dest}")


def save_trained(config: Config, trainer) -> None:
    """Save the trained weights (all ranks take part): full weights into WORK_DIR/final, or the
    adapter into WORK_DIR/final (MERGE=0; adapter_config.json names the base) or WORK_DIR/adapter."""
    final, adapter = config.work / "final", config.work / "adapter"
    if trainer.args.process_index == 0:
        for folder in (final, adapter):
            shutil.rmtree(folder, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(adapter if config.peft and config.merge else final))
    trainer.accelerator.wait_for_everyone()


def bundle_base(config: Config, final: Path) -> str:
    """The base an adapter run records: its Hub id, or RUN_BASE after copying a local base folder in."""
    base = Path(config.base_model)
    if not base.is_dir():
        return config.base_model
    shutil.copytree(base, final / RUN_BASE, ignore=shutil.ignore_patterns(".*", "*.md"), dirs_exist_ok=True)
    adapter_config = final / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = RUN_BASE
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
    log(f"the base is a local folder: copied it into the run as {RUN_BASE}/")
    return RUN_BASE


def finish_output(config: Config, tokenizer, train_loss: float, steps: int, held: list[list[dict]]) -> Path:
    """Main process: merge the adapter when asked (else bundle a local base with it), add the tokenizer,
    the held-out conversations and llm-atc.json; the folder."""
    final, adapter = config.work / "final", config.work / "adapter"
    if config.peft and config.merge:
        merge_adapter(config, adapter, final)
        shutil.rmtree(adapter, ignore_errors=True)
    base = bundle_base(config, final) if config.peft and not config.merge else config.base_model
    tokenizer.save_pretrained(str(final))
    (final / "training_args.bin").unlink(missing_ok=True)
    info = {
        "model_type": config.model_type,
        "base_model": base,
        "merged": config.model_type == "full" or config.merge,
        "train_loss": train_loss,
        "steps": steps,
    }
    if held:
        write_conversations(final / HELD_OUT_FILE, held)
        info["held_out"] = {"file": HELD_OUT_FILE, "conversations": len(held), "fraction": config.eval_fraction}
    (final / "llm-atc.json").write_text(json.dumps(info, indent=2) + "\n")
    return final


def mean_train_loss(trainer, result) -> float:
    """The mean logged step loss over the whole run, resumed parts included."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return float(sum(losses) / len(losses)) if losses else float(result.training_loss)


def make_time_limit_callback(max_hours: float):
    """A TrainerCallback that saves a checkpoint and stops training once ``max_hours`` have passed (every rank
    stops at the same step: the ranks agree on it, so none waits for the others forever)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        started = time.monotonic()
        reached = False

        def on_step_end(self, args, state, control, **kwargs):
            over = time.monotonic() - self.started >= max_hours * 3600
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                import torch

                flag = torch.tensor([1.0 if over else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over = bool(flag.item())
            if over:
                self.reached = True
                control.should_save = True
                control.should_training_stop = True
            return control

    return TimeLimit()


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    try:
        config = read_config()
    except SettingError as exc:
        raise SystemExit(f"llm-atc: {exc}") from None
    check_qlora(config)

    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    datasets.disable_progress_bars()  # TRL's dataset preparation bars only clutter the job log

    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    config.work.mkdir(parents=True, exist_ok=True)
    args = training_args(config, cuda=cuda, world_size=world_size)  # also sets up torch.distributed
    log(
        f"{config.model_type} fine-tuning of {config.base_model} on {config.data} "
        f"({f'CUDA x{world_size}' if cuda else 'CPU'}, output {config.output_uri})"
    )

    with args.main_process_first(local=True, desc="data download"):
        data_path = fetch_data(config)
    try:
        conversations = load_conversations(str(data_path))
    except DataError as exc:
        raise SystemExit(f"llm-atc: DATA {config.data}: {exc}") from None
    counts = summarize(conversations)
    log(
        f"data: {counts['conversations']} conversations, {counts['turns']} turns "
        f"({counts['assistant_turns']} assistant turns)"
    )
    conversations, held = split_held_out(conversations, config.eval_fraction)
    if held:
        log(f"held out {len(held)} conversations for evaluation (EVAL_FRACTION={config.eval_fraction:g}); "
            f"training on {len(conversations)}")  # fmt: skip
    elif config.eval_fraction:
        log(f"held out no conversation (EVAL_FRACTION={config.eval_fraction:g} of {counts['conversations']})")

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    if ensure_chat_template(tokenizer):
        log("the tokenizer has no chat template: using Vicuna v1.1's")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = build_dataset(tokenizer, conversations, config.max_seq_len)

    resume = resume_checkpoint(config, args)
    model, peft_config = load_model(config, cuda=cuda, world_size=world_size, local_rank=local_rank)
    callbacks = [make_upload_callback(config)] if is_bucket_uri(config.output_uri) else []
    time_limit = make_time_limit_callback(config.max_hours) if config.max_hours else None
    callbacks += [time_limit] if time_limit else []
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if peft_config is not None and trainer.args.process_index == 0:
        trainable, total = trainer.model.get_nb_trainable_parameters()
        log(f"LoRA r={config.lora_r} alpha={config.lora_alpha}: {trainable:,} of {total:,} parameters trainable")

    result = trainer.train(resume_from_checkpoint=resume)
    steps = int(trainer.state.global_step)
    train_loss = mean_train_loss(trainer, result)
    rate = result.metrics.get("train_steps_per_second")
    if rate is not None:
        log(f"trained to step {steps} ({rate:.2f} steps/s over {result.metrics.get('train_runtime', 0):.1f}s)")

    if time_limit is not None and time_limit.reached:
        raise SystemExit(
            f"{TIME_LIMIT_MARKER} {config.max_hours:g} hours reached at step {steps}; its last checkpoint is kept: "
            "the same command with --resume goes on from there"
        )
    save_trained(config, trainer)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if not _is_main_process():
        return
    final = finish_output(config, tokenizer, train_loss, steps, held)
    publish(final, config.output_uri)
    # Done: a later run in this WORK_DIR must start afresh, not resume from this run's last checkpoint.
    shutil.rmtree(config.checkpoints, ignore_errors=True)
    print(f"{FINISHED_MARKER} steps={steps} train_loss={train_loss:.4f} output={config.output_uri}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr, flush=True)
            sys.exit(1)
        raise
