"""What became of every recorded deployment and training run, and ending them.

``reconcile`` is the one place where records meet what their backends see (a job on a cluster, a
managed job, a SkyServe service, a process here), including clusters stopped or torn down with
`sky stop` / `sky down` directly: `status`, `list`, `logs`, `endpoint` and the Python handles all
read the truth through it. ``end`` stops or tears down, or says in one line why it cannot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from llm_atc import ui
from llm_atc.backends import LiveState, backend_for
from llm_atc.bucket_uri import RUN_PREFIX
from llm_atc.errors import LaunchError, NotFoundError, UserError
from llm_atc.readiness import served_models, try_model
from llm_atc.registry import Record, Registry, Status
from llm_atc.storage import BucketURI, check_checkpoint, delete_prefix, store_env
from llm_atc.tunnel import Tunnel
from llm_atc.tunnel import forward as open_tunnel

ENDED = (Status.DOWN, Status.SUCCEEDED, Status.FAILED, Status.STOPPED)
# action -> (question verb, progress verb, past tense, status recorded)
_ACTIONS = {
    "stop": ("Stop", "Stopping", "Stopped", Status.STOPPED),
    "down": ("Tear down", "Tearing down", "Tore down", Status.DOWN),
}


def lookup(ref: str, registry: Registry, *, port: int = 8000) -> Record:
    """The newest record (deployment or training run) named ``ref`` or on cluster ``ref``; a SkyPilot
    cluster llm-atc did not launch, when SkyPilot knows it, as a record that is not stored. Anything else
    is a NotFoundError naming the closest known names."""
    try:
        return registry.find(ref)
    except NotFoundError as exc:
        from llm_atc.backends import skypilot
        from llm_atc.options import is_cluster_name

        if "did you mean" in str(exc) or not is_cluster_name(ref):  # a typo of a known name: no need to ask
            raise
        try:
            known = skypilot.cluster_exists(ref)
        except UserError:
            known = False
        if not known:
            raise
        return Record(name=ref, kind="serve", model="", cluster=ref, status="UNKNOWN", port=port)


def refresh_runs(references, registry: Registry) -> None:
    """The training runs that ``references`` (``--name``, ``--lora`` or ``--base_model`` values: ``llm-atc/<run>``,
    ``NAME=llm-atc/<run>``, others) name, asked what became of them where they may still run, so that resolving
    a reference reads the run's true state (a detached run may have finished since it was recorded)."""

    runs = []
    for reference in references:
        target = str(reference).split("=", 1)[-1].strip()
        if target.startswith(RUN_PREFIX + "/"):
            record = registry.find_run(target.split("/", 1)[1])
            if record is not None and record.is_active:
                runs.append(record)
    if runs:
        reconcile(runs, registry)


def needs_asking(record: Record) -> bool:
    """Whether the backend can tell anything new: a deployment not torn down, a run not over."""
    if record.kind == "serve":
        return record.status != Status.DOWN
    return record.is_active


def reconcile(records: list[Record], registry: Registry) -> dict[int, LiveState]:
    """Live states by record id; records whose state changed are updated in the registry."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        if record.id is not None and needs_asking(record):
            groups.setdefault("local" if record.is_local else "skypilot", []).append(record)
    states: dict[int, LiveState] = {}
    for kind, group in groups.items():
        backend = backend_for(group[0])
        try:
            if kind == "local":
                states.update(backend.states(group))
            else:
                with ui.spinner("Asking SkyPilot about the clusters (starts its API server the first time)"):
                    states.update(backend.states(group))
        except (UserError, LaunchError) as exc:
            ui.warn(f"could not ask {backend.name} about {len(group)} record(s), shown as last known: {exc}")
    for record in records:
        state = states.get(record.key) if record.id is not None else None
        if state is None:
            continue
        if state.gone and record.kind == "train" and record.mode != "local":
            state = _gone_run(record, state)
            states[record.key] = state
        if state.status != record.status:
            ended = record.kind == "serve" and state.status == Status.DOWN
            if state.status in ENDED and state.detail:  # why it ended, kept for `status` after the fact
                registry.update(record, status=state.status, details={**record.details, "ended": state.detail})
            else:
                registry.update(record, status=state.status)
            if ended:  # it ended by itself (its limits, a torn-down cluster): its key goes, as with `down`
                from llm_atc import credentials

                credentials.forget(record.cluster)
    return states


def _gone_run(record: Record, state: LiveState) -> LiveState:
    """A run whose cluster (or managed job) is gone: it succeeded when its model is in its bucket."""
    if not record.is_active:
        return LiveState(record.status, state.detail, gone=True)
    published = _published(record)
    return LiveState(
        Status.SUCCEEDED if published else Status.FAILED,
        f"{state.detail}; model {'published' if published else 'not published'}",
        gone=True,
    )


def _published(record: Record) -> bool:

    if not record.checkpoint_uri or "://" not in record.checkpoint_uri:
        return False
    try:
        with store_env(record.details.get("store_env") or {}):
            check_checkpoint(BucketURI.parse(record.checkpoint_uri))
    except UserError:
        return False
    return True


def _target(ref: str | Record, registry: Registry, port: int = 8000) -> Record:
    return ref if isinstance(ref, Record) else lookup(ref, registry, port=port)


def end(ref: str | Record, *, action: str, yes: bool, registry: Registry) -> Record:
    """``action`` is ``stop`` or ``down``; asks first (for clusters) unless ``yes``.

    A stop keeps what is needed to go on (a deployment's disk, a run's checkpoints); a teardown
    ends every record of the cluster, forgets its API key and frees its name, also when what it ran
    is already gone (a failed launch, a cluster torn down with `sky down`).
    """
    ask, doing, done, status = _ACTIONS[action]
    record = _target(ref, registry)
    ref = record.name if record.kind == "train" else record.cluster
    where = "this machine" if record.is_local else f"cluster {record.cluster}"
    backend = backend_for(record)
    if action == "stop":
        backend.check_stoppable(record)  # before anything is asked or changed
    if record.id is not None and needs_asking(record):
        reconcile([record], registry)
    if action == "stop" and record.id is not None and record.status in ENDED:
        ui.info(
            f"{record.name} is {record.status}: nothing to stop"
            + ("." if record.status == Status.DOWN else f" (`llm-atc down {ref}` ends it for good).")
        )
        return record
    if (
        not record.is_local
        and record.status != Status.DOWN
        and not ui.confirm(f"{ask} {record.name} on {where}?", yes=yes)
    ):
        raise SystemExit(ui.NOT_CONFIRMED)
    try:
        with ui.spinner(f"{doing} {record.name} on {where}"):
            if record.status != Status.DOWN:
                getattr(backend, action)(record)
    except NotFoundError:
        if record.id is None or action == "stop":
            raise
        ui.info(f"{record.cluster} was already gone.")
    if record.id is None:
        ui.info(f"{done} {record.name}.")
        return record
    if action == "down":
        from llm_atc import credentials

        credentials.forget(record.cluster)
        if record.kind == "train" and record.status != Status.SUCCEEDED:
            _forget_checkpoints(record)
    for stored in registry.records(kind=record.kind):
        if stored.cluster == record.cluster and _ends(stored, record, action):
            registry.update(record if stored.id == record.id else stored, status=status)
    ui.info(f"{done} {record.name}.")
    return record


def _ends(stored: Record, record: Record, action: str) -> bool:
    """Which records an action on ``record`` changes: a teardown ends every record of its cluster
    (a run: every attempt of it); a stop, the ones still running there."""
    if record.kind == "train" and stored.name != record.name:
        return False
    return stored.status != Status.DOWN if action == "down" else stored.is_active or stored.id == record.id


def _forget_checkpoints(record: Record) -> None:
    """A run torn down before it finished leaves no checkpoints that a new run of its name would resume from."""

    uri = record.checkpoint_uri or ""
    try:
        if "://" in uri:
            with store_env(record.details.get("store_env") or {}):
                removed = delete_prefix(BucketURI.parse(uri).child("checkpoints"))
        else:
            import shutil
            from pathlib import Path

            work = Path(record.details.get("log", "")).parent / "work" / "checkpoints"
            removed = sum(1 for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
            shutil.rmtree(work, ignore_errors=True)
    except UserError as exc:
        ui.warn(f"could not delete the partial checkpoints of {record.name} under {uri}: {exc}")
        return
    if removed:
        ui.info(f"Deleted {removed} checkpoint file(s) of {record.name} (it never finished).")


def logs(ref: str | Record, *, follow: bool, registry: Registry, output=None) -> int:
    record = _target(ref, registry)
    return backend_for(record).logs(record, follow=follow, output=output)


def endpoint(ref: str | Record, *, registry: Registry, port: int = 8000) -> tuple[Record, str]:
    """A deployment's record and its engine's base URL (``http://HOST:PORT``)."""
    record = _target(ref, registry, port)
    if record.kind != "serve":
        raise UserError(
            f"{ref} is a training run; it has no endpoint (serve it: llm-atc serve --name llm-atc/{record.name})"
        )
    if record.id is not None:
        reconcile([record], registry)
        if record.status in (Status.DOWN, Status.FAILED, Status.STOPPED):
            raise NotFoundError(f"{record.name} is not running (status {record.status}); see `llm-atc status`")
    url = backend_for(record).endpoint(record)
    if record.id is not None and url != record.endpoint:
        registry.update(record, endpoint=url)
    return record, url


def replicas(record: Record) -> list[tuple[str, str, str, str, str]]:
    """A SkyServe service's replicas, as rows (REPLICA, STATUS, INFRA, RESOURCES, $/HOUR); none for the rest."""
    return backend_for(record).replicas(record) if record.mode == "service" else []


def check_models(base: str, record: Record, api_key: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """Every model id the endpoint at ``base`` lists, with the answer to one real request of its kind for each
    of the deployment's own models; and those of its own models the endpoint does not list."""
    engine, cafile = record.engine or "vllm", record.details.get("tls_cert")
    listed = served_models(base, engine, record.name, api_key=api_key, cafile=cafile)
    ours = record.served if record.id is not None else []  # a cluster llm-atc did not launch: just list
    answers = [
        (model, try_model(base, model, record.task_of(model), engine=engine, api_key=api_key, cafile=cafile))
        if model in ours
        else (model, "")
        for model in listed
    ]
    return answers, [name for name in ours if name not in listed]


@contextmanager
def forward(record: Record, *, local_port: int | None = None) -> Iterator[Tunnel]:
    """An SSH tunnel from 127.0.0.1 to the deployment's engine, open while the block runs."""
    with open_tunnel(record, local_port=local_port) as tunnel:
        yield tunnel
