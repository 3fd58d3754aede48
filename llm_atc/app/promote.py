"""``llm-atc promote``: put a fine-tune behind a stable model name only when it scores better on held-out data,
with no failed request, and keep the previous version for ``--rollback``.

How a name switches depends on what serves it:

* **An adapter on a vLLM deployment** (cluster or this machine): the candidate run is loaded as ``NAME@vK``
  (clients may pin versions), both are scored through the endpoint on the same conversations, and when the
  candidate wins, vLLM reloads ``NAME`` in place from the candidate's files (``load_inplace``: the engine swaps
  the weights between two steps, so every request is answered, by the old or the new version). ``NAME@v<prev>``
  stays loaded; older versions are unloaded.
* **An adapter on a SkyServe service with runtime LoRA**: the same, through the service's adapter manifest; each
  replica reloads ``NAME`` in place when its entry changes, and promote waits until every ready replica has.
* **A full model on a SkyServe service**: ``sky.serve.update`` with the candidate's checkpoint in place of the
  current one (rolling, or blue-green with ``--blue_green``); the service keeps its served name. The candidate
  cannot be scored on the service before it serves it, so its score is the one ``llm-atc eval`` recorded for it
  on the same data (serve it anywhere first), compared with the service's own score measured now.
* **A full model on a cluster deployment**: refused, saying what it takes (a deployment beside it, eval, swap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llm_atc import credentials, ui
from llm_atc.app import adapters, evaluate, lifecycle
from llm_atc.app.launch import save_task
from llm_atc.backends import backend_for
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.evaluation import Gain, Score, gain
from llm_atc.options import check_number, shorten
from llm_atc.registry import Record, Registry
from llm_atc.spec import API_KEY_SECRET, LORA_NAME_RE
from llm_atc.storage import BucketURI, check_checkpoint, store_env

VERSION_MARK = "@v"  # NAME@v3: version 3 of NAME


@dataclass(frozen=True)
class Promotion:
    """What promote (or a rollback) did: NAME on DEPLOYMENT now serves ``version`` (run ``run``)."""

    name: str
    deployment: str
    version: int
    run: str
    gain: Gain | None = None
    forced: bool = False


def check_options(name: str, min_gain: float, data: str | None, run: str | None, limit: int, timeout: float) -> None:
    """The cheap checks, before anything is read or asked."""
    if not (name or "").strip() or any(c.isspace() for c in name) or VERSION_MARK in name:
        raise UserError(
            f"--as {shorten(str(name))}: give a model name (no spaces, no {VERSION_MARK}N: promote numbers)"
        )
    check_number(min_gain, "--min_gain")
    evaluate.check_sources(data, run)
    evaluate.check_bounds(limit, timeout)


def versioned(name: str, version: int) -> str:
    return f"{name}{VERSION_MARK}{version}"


def _state(record: Record, name: str) -> dict:
    return record.details.get("promotions", {}).get(name) or {"versions": {}}


def _save_state(record: Record, name: str, state: dict, registry: Registry, **changes) -> Record:
    promotions = {**record.details.get("promotions", {}), name: state}
    return registry.update(record, details={**record.details, "promotions": promotions}, **changes)


def _is_adapter_run(trained: Record) -> bool:
    uri = str(trained.checkpoint_uri)
    if "://" not in uri:
        return (Path(uri) / "adapter_config.json").is_file()

    with store_env(trained.details.get("store_env") or {}):
        return check_checkpoint(BucketURI.parse(uri)).is_adapter


def promote(
    candidate: str,
    *,
    on: str,
    name: str,
    registry: Registry,
    min_gain: float = 0.0,
    force: bool = False,
    data: str | None = None,
    data_run: str | None = None,
    limit: int = evaluate.DEFAULT_LIMIT,
    timeout: float = evaluate.DEFAULT_TIMEOUT,
    blue_green: bool = False,
    secrets: dict[str, str] | None = None,
    per_token: bool | None = None,
) -> Promotion:
    """Switch ``name`` on deployment ``on`` to run ``candidate`` if it scores better by ``min_gain`` (the whole
    95% interval of the gain), or regardless with ``force``. Raises UserError (nothing changed) otherwise."""

    check_options(name, min_gain, data, data_run, limit, timeout)
    trained = evaluate.trained_run(candidate, registry)
    record = registry.find(on, kind="serve")
    lifecycle.reconcile([record], registry)
    held = evaluate.data_file(data) if data else evaluate.held_out(data_run or trained.name, registry)
    scoring = {"min_gain": min_gain, "force": force, "limit": limit, "timeout": timeout, "per_token": per_token}
    if not _is_adapter_run(trained):
        if record.mode == "service":
            return _update_service(
                record, trained, name, held, registry, blue_green=blue_green, secrets=secrets or {}, **scoring
            )
        raise UserError(
            f"llm-atc/{trained.name} is a full model; a cluster deployment changes models only by a new one: "
            f"llm-atc serve --name llm-atc/{trained.name} -c NEW, llm-atc eval NEW --run llm-atc/{trained.name}, "
            f"then move clients and llm-atc down {record.cluster} (or train adapters: --envs MERGE=0)"
        )
    if blue_green:
        raise UserError("--blue_green applies to a full model on a SkyServe service; adapters switch in place")
    return _promote_adapter(record, trained, name, held, registry, **scoring)


# --- adapters: load as NAME@vK, score, reload NAME in place ---------------------------------------------------


def _promote_adapter(record, trained, name, held, registry, *, min_gain, force, limit, timeout, per_token):

    record = adapters.deployment(record.cluster, registry)
    if name in adapters._base_names(record):
        raise UserError(
            f"{name} is the model {record.cluster} itself serves; promote adapters under a name of their own "
            f"(clients then call model=NAME)"
        )

    if not LORA_NAME_RE.fullmatch(name):
        raise UserError(f"--as {shorten(name)}: an adapter's name has letters, digits, . _ / - only")
    store = trained.details.get("store_env") or {}
    state = _state(record, name)
    version = max((int(v) for v in state["versions"]), default=0) + 1
    ref = f"llm-atc/{trained.name}"
    option = f"promote {ref}: "
    checked = adapters.checked_ref(record, versioned(name, version), ref, registry, store, option=option)
    api_key = credentials.get(record.cluster)
    with adapters.reach(record, registry) as base_url:
        loaded = adapters.served_from(base_url, record, api_key)
    if checked.name in loaded:
        raise UserError(f"{record.cluster} already serves {checked.name}; remove it first (llm-atc adapters remove)")
    if name in loaded and not state["versions"]:
        # NAME was added by hand (adapters add, --lora): it becomes version 0, kept for --rollback.
        entry = record.details.get("adapters", {}).get(name) or {}
        state = {"versions": {"0": {"ref": entry.get("ref") or "--lora at start", "path": loaded[name]}}, "current": 0}
    current = name if name in loaded else record.name
    record = adapters.add(record, checked, registry, store)
    try:
        result = evaluate.evaluate(
            record,
            held,
            models=[current, checked.name],
            limit=limit,
            timeout=timeout,
            registry=registry,
            per_token=per_token,
        )
    except BaseException:
        adapters.remove(_fresh(record, registry), checked.name, registry)
        raise
    evaluate.keep(result, record, registry)
    evaluate.report(result)
    comparison = gain(
        result.scores[current], result.losses[current], result.scores[checked.name], result.losses[checked.name]
    )
    record = _fresh(record, registry)
    if not force and not comparison.low >= min_gain:
        record = adapters.remove(record, checked.name, registry)
        scores = {k: v for k, v in record.details.get("scores", {}).items() if k != checked.name}
        registry.update(record, details={**record.details, "scores": scores})
        raise UserError(_refusal(ref, current, comparison, min_gain, held.label))
    path = record.details["adapters"][checked.name]["path"]
    entry = {"ref": ref, "path": path, "rank": checked.rank, "run": trained.name}
    previous = state.get("current")
    with ui.spinner(f"Switching {name} on {record.cluster} to {checked.name}"):
        if record.mode == "service":
            _switch_service(record, name, checked.name, previous)
        else:
            with adapters.reach(record, registry) as base_url:
                now_served = adapters.served_from(base_url, record, api_key)
                if previous is not None and versioned(name, previous) not in now_served:
                    _load(
                        base_url, record, api_key, versioned(name, previous), state["versions"][str(previous)]["path"]
                    )
                _load(base_url, record, api_key, name, path, inplace=name in loaded)
                _unload_old(base_url, record, api_key, name, keep={version, previous})
    state = {
        "versions": {
            **state["versions"],
            str(version): {**entry, **comparison.candidate.details(), "data": held.label, "at": time.time()},
        },
        "current": version,
        "previous": previous,
    }
    record = _fresh(record, registry)
    listed = {k: v for k, v in record.details.get("adapters", {}).items() if not k.startswith(name + VERSION_MARK)}
    versions = state["versions"]
    for number in [version] + ([previous] if previous is not None else []):
        listed[versioned(name, number)] = {**_entry(versions[str(number)]), "version": number}
    listed[name] = {**_entry(versions[str(version)]), "version": version}
    record = registry.update(
        record,
        details={**record.details, "adapters": listed, "scores": _scores_after(record, name, versions[str(version)])},
    )
    _save_state(record, name, state, registry)
    return Promotion(
        name, record.cluster, version, trained.name, comparison, forced=force and comparison.low < min_gain
    )


def rollback(*, on: str, name: str, registry: Registry, secrets: dict[str, str] | None = None) -> Promotion:
    """Switch ``name`` back to the version it served before the last promote (again: forward)."""

    record = registry.find(on, kind="serve")
    state = _state(record, name)
    if state.get("previous") is None:
        raise NotFoundError(f"{record.cluster} has no earlier version of {shorten(name)} to roll back to")
    if record.details.get("service_update"):
        return _rollback_service(record, name, state, registry, secrets or {})
    record = adapters.deployment(record.cluster, registry)
    back, now = int(state["previous"]), int(state["current"])
    target = state["versions"][str(back)]
    api_key = credentials.get(record.cluster)
    with ui.spinner(f"Switching {name} on {record.cluster} back to version {back}"):
        if record.mode == "service":
            _switch_service(record, name, versioned(name, back), now)
        else:
            with adapters.reach(record, registry) as base_url:
                _load(base_url, record, api_key, name, target["path"], inplace=True)
    adapters_now = {**record.details.get("adapters", {}), name: {**_entry(target), "version": back}}
    record = registry.update(
        record, details={**record.details, "adapters": adapters_now, "scores": _scores_after(record, name, target)}
    )
    _save_state(record, name, {**state, "current": back, "previous": now}, registry)
    return Promotion(name, record.cluster, back, target.get("run") or target.get("ref", ""))


def _entry(version: dict) -> dict:
    """What the deployment's adapter list keeps of a version."""
    return {key: version[key] for key in ("ref", "path", "rank", "run") if key in version}


def _scores_after(record: Record, name: str, version: dict) -> dict:
    """The deployment's recorded scores once ``name`` serves ``version``: the score it had when promoted."""
    scores = dict(record.details.get("scores", {}))
    scores.pop(name, None)
    if "nll" in version:
        scores[name] = {k: v for k, v in version.items() if k not in ("ref", "path", "rank", "run")}
    return scores


def _refusal(ref: str, current: str, comparison: Gain, min_gain: float, data: str) -> str:
    cand, cur = comparison.candidate, comparison.current
    return (
        f"{ref} is not better than {current} by {min_gain:g}: {cand.nll:.4f} vs {cur.nll:.4f} nats/token on "
        f"{cand.chats} chats of {data} (gain {comparison.text()}); nothing changed (--force switches anyway)"
    )


def _load(base_url: str, record: Record, api_key: str | None, name: str, path: str, *, inplace: bool = False) -> None:
    body = {"lora_name": name, "lora_path": path, **({"load_inplace": True} if inplace else {})}
    status, text = adapters._post(base_url + "/v1/load_lora_adapter", body, api_key, record)
    if status != 200:
        raise LaunchError(f"vLLM on {record.cluster} did not load {name} ({status}): {adapters._message(text)}")


def _unload_old(base_url: str, record: Record, api_key: str | None, name: str, keep: set) -> None:
    """Unload the versions of ``name`` other than ``keep`` (the current and the previous)."""
    for loaded in adapters.served_from(base_url, record, api_key):
        version = loaded.removeprefix(name + VERSION_MARK)
        if loaded.startswith(name + VERSION_MARK) and version.isdigit() and int(version) not in keep:
            adapters._post(base_url + "/v1/unload_lora_adapter", {"lora_name": loaded}, api_key, record)


# --- SkyServe services ------------------------------------------------------------------------------------


def _switch_service(record: Record, name: str, version_name: str, keep: int | None) -> None:
    """Point the manifest's NAME at ``version_name``'s source; every ready replica reloads it in place."""
    listed = adapters._manifest(record)
    if version_name not in listed:
        raise LaunchError(f"the adapter manifest of {record.cluster} lists no {version_name}")
    source = listed[version_name]
    kept = versioned(name, keep) if keep is not None else None
    wanted = {k: v for k, v in listed.items() if not k.startswith(name + VERSION_MARK) or k in {version_name, kept}}
    if kept is not None and kept not in wanted and name in listed:
        wanted[kept] = listed[name]  # NAME as it was (added by hand): kept for --rollback
    adapters._write_manifest(record, {**wanted, name: source})
    adapters.wait_replicas(record, name, present=True, source=source.get("uri") or source.get("hub"))


def _update_service(
    record, trained, name, held, registry, *, min_gain, force, limit, timeout, blue_green, secrets, per_token
):
    """A full-model run on a SkyServe service: sky.serve.update to the candidate's checkpoint."""
    if name not in adapters._base_names(record):
        raise UserError(
            f"{record.cluster} serves {record.name}, not {shorten(name)}: a full model takes over the service's "
            f"own name (--as {record.name})"
        )
    current = evaluate.serving_run(record, registry)
    if current is None:
        raise UserError(f"{record.cluster} serves {shorten(record.model)}, not a run of llm-atc's to promote over")
    if trained.model != current.model:
        raise UserError(
            f"llm-atc/{trained.name} was trained on {trained.model}, but {record.cluster} serves a fine-tune of "
            f"{current.model}"
        )
    config = _task_with(record.task_yaml, str(current.checkpoint_uri), str(trained.checkpoint_uri))
    task_secrets = _service_secrets(record, config, secrets)
    recorded = (trained.details.get("scores") or {}).get(held.label)
    if recorded is None and not force:
        raise UserError(
            f"llm-atc/{trained.name} has no score on {held.label} yet: serve it (llm-atc serve --name "
            f"llm-atc/{trained.name} ...), run llm-atc eval on it with the same data, then promote again (or --force)"
        )
    comparison = None
    if recorded is not None:
        result = evaluate.evaluate(
            record, held, models=[name], limit=limit, timeout=timeout, registry=registry, per_token=per_token
        )
        evaluate.keep(result, record, registry)
        evaluate.report(result)
        candidate = Score(
            f"llm-atc/{trained.name}",
            recorded["chats"],
            recorded["tokens"],
            recorded["nll"],
            recorded["nll_low"],
            recorded["nll_high"],
        )
        comparison = gain(result.scores[name], [], candidate, [])
        if not force and not comparison.low >= min_gain:
            raise UserError(_refusal(f"llm-atc/{trained.name}", name, comparison, min_gain, held.label))
    record = _fresh(record, registry)
    state = _state(record, name)
    if not state["versions"]:
        state = {
            "versions": {"0": {"run": current.name, "model": record.model, "task_yaml": record.task_yaml}},
            "current": 0,
        }
    version = max(int(v) for v in state["versions"]) + 1
    task_yaml = _update(record, config, task_secrets, blue_green=blue_green)
    entry = {
        "run": trained.name,
        "model": str(trained.checkpoint_uri),
        "task_yaml": task_yaml,
        "at": time.time(),
        **(comparison.candidate.details() if comparison else {}),
    }
    state = {"versions": {**state["versions"], str(version): entry}, "current": version, "previous": state["current"]}
    record = registry.update(record, details={**record.details, "service_update": True})
    _save_state(record, name, state, registry, model=str(trained.checkpoint_uri), task_yaml=task_yaml)
    forced = force and (comparison is None or comparison.low < min_gain)
    return Promotion(name, record.cluster, version, trained.name, comparison, forced=forced)


def _task_with(task_yaml: str | None, old_uri: str, new_uri: str) -> dict:
    """The service's saved task with the candidate's checkpoint wherever the current one is named."""
    import yaml

    if not task_yaml or not Path(task_yaml).is_file():
        raise UserError("the service's task file is gone from llm-atc's home; serve the candidate as a new service")
    config = yaml.safe_load(Path(task_yaml).read_text())
    swapped = 0

    def swap(value):
        nonlocal swapped
        if isinstance(value, str) and old_uri in value:
            swapped += 1
            return value.replace(old_uri, new_uri)
        return value

    config["envs"] = {key: swap(value) for key, value in (config.get("envs") or {}).items()}
    if config.get("file_mounts"):
        config["file_mounts"] = {key: swap(value) for key, value in config["file_mounts"].items()}
    if not swapped:
        raise UserError(f"the service's task does not name {old_uri}; serve the candidate as a new service")
    return config


def _service_secrets(record: Record, config: dict, given: dict[str, str]) -> dict[str, str]:
    """The secret values the new replicas need: the API key llm-atc keeps, and the others given again."""

    values = dict(given)
    key = credentials.get(record.cluster)
    if key:
        values.setdefault(API_KEY_SECRET, key)
    missing = [k for k, v in (config.get("secrets") or {}).items() if v is None and k not in values]
    if missing:
        raise UserError(
            f"{record.cluster} was started with secret {missing[0]}: give it again (--secret {missing[0]}=...)"
        )
    return {k: v for k, v in values.items() if k in (config.get("secrets") or {})}


def _update(record: Record, config: dict, secrets: dict[str, str], *, blue_green: bool) -> str:
    """Hand the new task to SkyServe; the path of its saved (secret-free) YAML."""

    how = "blue-green" if blue_green else "rolling"
    with ui.spinner(f"Updating service {record.cluster} ({how})"):
        backend_for(record).update_service(record, config, secrets, blue_green=blue_green)
    return save_task(config, record.cluster)


def _rollback_service(record: Record, name: str, state: dict, registry: Registry, secrets: dict[str, str]):
    import yaml

    back, now = int(state["previous"]), int(state["current"])
    target = state["versions"][str(back)]
    config = yaml.safe_load(Path(target["task_yaml"]).read_text())
    task_yaml = _update(record, config, _service_secrets(record, config, secrets), blue_green=False)
    _save_state(
        record,
        name,
        {**state, "current": back, "previous": now},
        registry,
        model=target["model"],
        task_yaml=task_yaml,
    )
    return Promotion(name, record.cluster, back, target["run"])


def _fresh(record: Record, registry: Registry) -> Record:
    return registry.find(record.cluster, kind="serve")
