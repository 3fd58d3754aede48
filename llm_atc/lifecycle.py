"""Stopping and tearing down deployments, keeping the registry in step."""

from __future__ import annotations

from llm_atc import ui
from llm_atc.backends import backend_for, lookup
from llm_atc.registry import Registry, Status

# action -> (question verb, progress verb, past tense, status recorded)
_ACTIONS = {
    "stop": ("Stop", "Stopping", "Stopped", Status.STOPPED),
    "down": ("Tear down", "Tearing down", "Tore down", Status.DOWN),
}


def end_deployment(name: str, *, action: str, yes: bool, registry: Registry | None = None) -> None:
    """``action`` is ``stop`` or ``down``; asks first (for clusters) unless ``yes``."""
    ask, doing, done, status = _ACTIONS[action]
    registry = registry or Registry()
    record = lookup(name, registry)
    where = "this machine" if record.is_local else f"cluster {record.cluster}"
    backend = backend_for(record)
    if action == "stop":
        backend.check_stoppable(record)
    if not record.is_local and not ui.confirm(f"{ask} {record.name} on {where}?", yes=yes):
        raise SystemExit(1)
    with ui.spinner(f"{doing} {record.name} on {where}"):
        getattr(backend, action)(record)
    if action == "down":
        from llm_atc import credentials

        credentials.forget(record.cluster)
    # A stop keeps FAILED visible; a teardown ends every record of the cluster.
    keep = {Status.DOWN} if action == "down" else {Status.DOWN, Status.FAILED}
    for stored in registry.records(kind="serve"):
        if stored.cluster == record.cluster and stored.status not in keep:
            registry.update(stored, status=status)
    ui.info(f"{done} {record.name}.")
