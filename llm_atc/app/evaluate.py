"""``llm-atc eval``: score the models a live vLLM deployment serves on held-out conversations, through the
endpoint itself.

For each conversation, vLLM's ``/tokenize`` renders it with the chat template the server applies (its own or
``--chat_template``), turn by turn, which tells where each reference assistant turn lies in the token ids; one
``/v1/completions`` request per model then returns the log-probability of every prompt token (``echo`` with
``logprobs``), and the assistant tokens' sum is the conversation's loss (:mod:`llm_atc.evaluation`). Bounded in
conversations and seconds, a few requests in flight, progress shown, the API key and an SSH tunnel handled as
``adapters`` does.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llm_atc import credentials, ui
from llm_atc.app.adapters import _message, reach, running_vllm, served
from llm_atc.app.lifecycle import refresh_runs
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.evaluation import ChatLoss, Score, TemplateMismatch, assistant_spans, chat_loss, score
from llm_atc.options import shorten
from llm_atc.readiness import trusting
from llm_atc.recipes.train.contract import HELD_OUT_FILE
from llm_atc.registry import Record, Registry, Status

DEFAULT_LIMIT = 200  # conversations scored at most
DEFAULT_TIMEOUT = 600  # seconds for the whole evaluation
LIMITS = {"--limit": (1, 100_000), "--timeout": (1, 86_400)}
IN_FLIGHT = 4  # conversations scored at once
REQUEST_TIMEOUT = 120  # seconds for one request


@dataclass(frozen=True)
class HeldOut:
    """Conversations to score, and where they came from (a file, or a run's held-out share)."""

    label: str
    conversations: list[list[dict]]


@dataclass
class Evaluation:
    """What ``eval`` measured: each model's score and per-conversation losses (on the same conversations)."""

    deployment: str
    data: HeldOut
    scores: dict[str, Score]
    losses: dict[str, list[ChatLoss]]
    requests: int
    seconds: float
    skipped: Counter = field(default_factory=Counter)  # reason -> conversations
    unfinished: int = 0  # conversations not scored when the time ran out

    def details(self) -> dict:
        return {
            "deployment": self.deployment,
            "data": self.data.label,
            "requests": self.requests,
            "seconds": round(self.seconds, 2),
            "skipped": dict(self.skipped),
            "unfinished": self.unfinished,
            "scores": {name: s.details() for name, s in self.scores.items()},
        }


def check_bounds(limit: int, timeout: float) -> None:
    """``--limit`` and ``--timeout``: whole numbers in range (one-line errors)."""
    for value, option in ((limit, "--limit"), (timeout, "--timeout")):
        low, high = LIMITS[option]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            shown = f"{value:g}" if isinstance(value, (int, float)) else shorten(str(value))
            raise UserError(f"{option} {shown}: give a number from {low} to {high}")


def check_sources(data: str | None, run: str | None) -> None:
    if data and run:
        raise UserError("give --data FILE or --run llm-atc/<run>, not both")


def deployment(ref: str, registry: Registry) -> Record:
    """A running vLLM deployment (the only engine that scores prompt tokens); one-line refusals otherwise."""

    return running_vllm(ref, registry, lacking="scores no prompt tokens")


def run_name(ref: str) -> str:
    return ref.removeprefix("llm-atc/")


def trained_run(ref: str, registry: Registry) -> Record:
    """The finished training run ``llm-atc/<run>`` (or ``<run>``)."""

    name = run_name(ref)
    refresh_runs([f"llm-atc/{name}"], registry)
    record = registry.find_run(name)
    if record is None:
        raise NotFoundError(f"no training run named {shorten(name)}; see `llm-atc list`")
    if record.status != Status.SUCCEEDED:
        raise UserError(f"llm-atc/{name} is {record.status}, not SUCCEEDED: it has no held-out data yet")
    return record


def held_out(ref: str, registry: Registry) -> HeldOut:
    """The conversations run ``ref`` held out of its training (``<checkpoint>/eval.jsonl``)."""
    record = trained_run(ref, registry)
    name, where = record.name, str(record.checkpoint_uri)
    missing = UserError(
        f"llm-atc/{name} kept no held-out data ({HELD_OUT_FILE}: trained with --eval_fraction 0, on too few "
        "conversations, or before llm-atc kept it); give --data FILE"
    )
    if "://" in where:
        from llm_atc.storage import BucketURI, ObjectStore, store_env

        uri = BucketURI.parse(where).child(HELD_OUT_FILE)
        with store_env(record.details.get("store_env") or {}):
            try:
                text = ObjectStore(uri.scheme).read_text(uri)
            except NotFoundError:
                raise missing from None
    else:
        path = Path(where) / HELD_OUT_FILE
        if not path.is_file():
            raise missing
        return HeldOut(f"llm-atc/{name} held-out", _load(str(path), f"llm-atc/{name}/{HELD_OUT_FILE}"))
    return HeldOut(f"llm-atc/{name} held-out", _parse(text, f"llm-atc/{name}/{HELD_OUT_FILE}"))


def data_file(value: str) -> HeldOut:
    """``--data``: a local file, ``s3://`` or ``gs://``, in any format ``train`` reads."""
    if "://" in value:
        from llm_atc.storage import BucketURI, ObjectStore

        uri = BucketURI.parse(value, option="--data")
        return HeldOut(value, _parse(ObjectStore(uri.scheme).read_text(uri), f"--data {shorten(value)}"))
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--data {shorten(value)}: no such file")
    return HeldOut(value, _load(str(path), f"--data {shorten(value)}"))


def _parse(text: str, where: str) -> list[list[dict]]:
    """Conversations read from a downloaded file's text, as ``train`` reads its data."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as copy:
        copy.write(text)
        copy.flush()
        return _load(copy.name, where)


def _load(path: str, where: str) -> list[list[dict]]:
    from llm_atc.recipes.train.finetune import DataError, load_conversations

    try:
        return load_conversations(path)
    except DataError as exc:
        raise UserError(f"{where}: {exc}") from None


def serving_run(record: Record, registry: Registry) -> Record | None:
    """The training run a deployment serves (``--name llm-atc/<run>``), if it serves one."""
    for ref in (record.name, record.model):
        if ref.startswith("llm-atc/"):
            return registry.find_run(run_name(ref))
    location = str(record.model)
    return next((r for r in registry.records(kind="train") if str(r.checkpoint_uri) == location), None)


def default_data(record: Record, registry: Registry) -> HeldOut:
    """No --data, no --run: the held-out share of the run the deployment serves."""
    run = serving_run(record, registry)
    if run is not None:
        return held_out(run.name, registry)
    raise UserError(
        f"{record.cluster} serves {shorten(record.model)}, not a run of llm-atc's: give --data FILE or "
        "--run llm-atc/<run> (its held-out conversations)"
    )


def base_names(record: Record) -> set[str]:
    """The names the deployment's own models answer to (not adapters)."""
    return {record.name, *record.served, *record.details.get("aliases", ())}


def models_to_score(record: Record, asked: list[str], served: list[str]) -> list[str]:
    """``--model`` names, each served now; by default the deployment's model and every adapter (not aliases)."""
    from llm_atc.recipes.train.contract import RUN_BASE

    if asked:
        unknown = [name for name in asked if name not in served]
        if unknown:
            raise UserError(
                f"{record.cluster} serves no model {shorten(unknown[0])} (it serves: {', '.join(served) or 'none'})"
            )
        return list(dict.fromkeys(asked))
    aliases = set(record.details.get("aliases", ()))
    return [name for name in served if name not in aliases and not name.endswith(f"/{RUN_BASE}")]


class Endpoint:
    """The deployment's tokenizer and completions routes, with its API key."""

    def __init__(self, base_url: str, record: Record, api_key: str | None, *, per_token: bool = False):
        self.base_url, self.record, self.api_key, self.per_token = base_url, record, api_key, per_token
        self.requests = 0
        self._counting = threading.Lock()

    def post(self, path: str, body: dict) -> dict:
        """The JSON reply; a 400 is a ValueError (this conversation), anything else a LaunchError."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with self._counting:  # requests are sent from several threads
            self.requests += 1
        context = trusting(self.record.details.get("tls_cert"))
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            message = _message((exc.read() or b"").decode(errors="replace"))
            if exc.code == 400:
                raise ValueError(message) from None
            raise LaunchError(f"{self.record.cluster} answered {path} with {exc.code}: {message}") from None
        except OSError as exc:
            raise LaunchError(f"{self.base_url}{path}: {exc}") from None

    def tokens(self, model: str, messages: list[dict], generation: bool) -> tuple[list[int], int]:
        reply = self.post("/tokenize", {"model": model, "messages": messages, "add_generation_prompt": generation})
        return reply["tokens"], int(reply.get("max_model_len") or 0)

    def logprobs(self, model: str, ids: list[int], spans: list[tuple[int, int]]) -> list[float | None]:
        """The log-probability of each token in ``spans`` given the ones before it: from the prompt's own
        log-probabilities (``echo``), or token by token (``per_token``)."""
        if not self.per_token:
            body = {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
            values = self.post("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
            return [values[i] for start, end in spans for i in range(start, end)]
        # One token generated after each prefix, restricted to the reference token: vLLM reports its log-probability
        # before the restriction (raw_logprobs), which is the model's own.
        return [
            self.post(
                "/v1/completions",
                {
                    "model": model,
                    "prompt": ids[:i],
                    "max_tokens": 1,
                    "logprobs": 0,
                    "temperature": 0,
                    "allowed_token_ids": [ids[i]],
                },
            )["choices"][0]["logprobs"]["token_logprobs"][0]
            for start, end in spans
            for i in range(start, end)
        ]


def token_by_token(record: Record) -> bool:
    """Whether prompt log-probabilities must be avoided: vLLM 0.32's CPU LoRA kernels fail on them (a shape error
    in the LoRA logits layer) and take the engine down, for every model, once LoRA is on."""
    return not record.accelerator and bool(record.details.get("lora") or record.details.get("adapters"))


def _layout(endpoint: Endpoint, model: str, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's ids up to its last assistant turn, and where its assistant turns are."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    turns = []
    for i, message in enumerate(messages[: last + 1]):
        if message["role"] == "assistant":
            prompt, _ = endpoint.tokens(model, messages[:i], True)
            through, limit = endpoint.tokens(model, messages[: i + 1], False)
            turns.append((prompt, through))
    full = turns[-1][1]
    if limit and len(full) >= limit:
        raise OverflowError(f"longer than the deployment's {limit} tokens")
    return full, assistant_spans(turns, full)


def _lay_out(endpoint: Endpoint, tokenizers: list[str], messages: list[dict]):
    """The conversation's ids and assistant spans under each tokenizer; or why it cannot be scored."""
    try:
        return {name: _layout(endpoint, name, messages) for name in tokenizers}
    except TemplateMismatch:
        return "the chat template renders it inconsistently"
    except OverflowError:
        return "longer than the context"
    except ValueError as exc:
        return f"refused: {shorten(str(exc), 80)}"


def _bounded(function, items: list, deadline: float, spinner, start: float, what: str) -> list:
    """``function(item)`` for each item, IN_FLIGHT at once, none started after ``deadline``; the results in
    order (None: not started). An exception ends it."""
    results: list = [None] * len(items)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        running: dict = {}
        queue = iter(range(len(items)))
        while True:
            while len(running) < IN_FLIGHT and time.monotonic() < deadline:
                index = next(queue, None)
                if index is None:
                    break
                running[pool.submit(function, items[index])] = index
            if not running:
                return results
            finished = [future for future in running if future.done()]
            for future in finished:
                results[running.pop(future)] = future.result()
            done = sum(r is not None for r in results)
            spinner.update(time.monotonic() - start, f"{what}: {done} of {len(items)}")
            time.sleep(0.02 if running else 0)


def evaluate(
    record: Record,
    data: HeldOut,
    *,
    models: list[str] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    registry: Registry,
    per_token: bool | None = None,
) -> Evaluation:
    """Score ``models`` (default: all the deployment serves) on up to ``limit`` of ``data``'s conversations,
    within ``timeout`` seconds; every model on the same conversations, one model at a time (vLLM's CPU LoRA
    kernels mix up the adapters of a batch that holds several). ``per_token``: score token by token (default:
    where the engine cannot give prompt log-probabilities)."""

    check_bounds(limit, timeout)
    if not data.conversations:
        raise UserError(f"{data.label}: no conversations to score")
    chats = data.conversations[:limit]
    start = time.monotonic()
    deadline = start + timeout
    with reach(record, registry) as base_url:
        api_key = credentials.get(record.cluster)
        names = models_to_score(record, list(models or ()), served(base_url, record, api_key))
        own = base_names(record)
        tokenizer_of = {name: name if name in own else record.name for name in names}
        if per_token is False and token_by_token(record):
            raise UserError(
                f"{record.cluster} runs vLLM's CPU build with LoRA on, which fails on prompt log-probabilities and "
                "would take the engine down; score it --per_token"
            )
        by_token = token_by_token(record) if per_token is None else per_token
        endpoint = Endpoint(base_url, record, api_key, per_token=by_token)
        what = f"Scoring {', '.join(names)} on {len(chats)} conversations of {data.label}"
        with ui.spinner(what) as spinner:
            tokenizers = list(dict.fromkeys(tokenizer_of.values()))
            layouts = _bounded(
                lambda m: _lay_out(endpoint, tokenizers, m), chats, deadline, spinner, start, "templates"
            )
            skipped = Counter(r for r in layouts if isinstance(r, str))
            ready = [r for r in layouts if isinstance(r, dict)]
            losses: dict[str, list] = {}
            for name in names:
                losses[name] = _bounded(
                    lambda layout, name=name: chat_loss(endpoint.logprobs(name, *layout[tokenizer_of[name]])),
                    ready,
                    deadline,
                    spinner,
                    start,
                    name,
                )
    complete = [i for i in range(len(ready)) if all(losses[name][i] is not None for name in names)]
    unfinished = len(chats) - len(complete) - sum(skipped.values())
    if not complete:
        reasons = "; ".join(f"{n} {why}" for why, n in skipped.items()) or f"none within {timeout:g}s"
        raise UserError(f"no conversation of {data.label} could be scored ({reasons})")
    kept = {name: [losses[name][i] for i in complete] for name in names}
    return Evaluation(
        record.cluster,
        data,
        {name: score(name, kept[name]) for name in names},
        kept,
        endpoint.requests,
        time.monotonic() - start,
        skipped,
        unfinished,
    )


def evaluate_deployment(
    ref: str,
    *,
    registry: Registry,
    models: list[str] | None = None,
    data: str | None = None,
    run: str | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    per_token: bool | None = None,
) -> Evaluation:
    """``llm-atc eval`` (and ``llm_atc.evaluate``): cheap checks, the deployment, the data, the scores, kept."""
    check_sources(data, run)
    check_bounds(limit, timeout)
    record = deployment(ref, registry)
    held = data_file(data) if data else held_out(run, registry) if run else default_data(record, registry)
    result = evaluate(record, held, models=models, limit=limit, timeout=timeout, registry=registry, per_token=per_token)
    keep(result, record, registry)
    return result


def run_of_model(record: Record, model: str, registry: Registry) -> Record | None:
    """The training run behind a model name the deployment serves, when it is one."""
    if model.startswith("llm-atc/"):
        return registry.find_run(run_name(model))
    entry = record.details.get("adapters", {}).get(model) or {}
    if entry.get("run"):
        return registry.find_run(entry["run"])
    if str(entry.get("ref") or "").startswith("llm-atc/"):
        return registry.find_run(run_name(entry["ref"]))
    return serving_run(record, registry) if model in base_names(record) else None


def keep(evaluation: Evaluation, record: Record, registry: Registry) -> Record:
    """Record the scores: on the deployment (per model) and on each scored run's own record (per data)."""
    at = time.time()
    for name, result in evaluation.scores.items():
        entry = {**result.details(), "data": evaluation.data.label, "at": at}
        trained = run_of_model(record, name, registry)
        if trained is not None:
            scores = {**trained.details.get("scores", {}), evaluation.data.label: {**entry, "on": record.cluster}}
            registry.update(trained, details={**trained.details, "scores": scores})
    scores = record.details.get("scores", {})
    scores = {
        **scores,
        **{n: {**s.details(), "data": evaluation.data.label, "at": at} for n, s in evaluation.scores.items()},
    }
    return registry.update(record, details={**record.details, "scores": scores})


def report(evaluation: Evaluation) -> None:
    """What was skipped or cut short, on stderr (the table or JSON goes to stdout)."""
    done = next(iter(evaluation.scores.values())).chats
    ui.info(
        f"Scored {done} conversations of {evaluation.data.label} in {evaluation.seconds:.1f}s "
        f"({evaluation.requests} requests)."
    )
    for why, count in evaluation.skipped.items():
        ui.warn(f"skipped {count} conversation(s): {why}")
    if evaluation.unfinished:
        ui.warn(f"{evaluation.unfinished} conversation(s) not scored: the time limit was reached (--timeout)")
