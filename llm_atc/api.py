"""The Python API: the same operations as the CLI (one code path, ``llm_atc.app``), returning objects
instead of printing.

    from llm_atc import serve, train
    with serve("./my-model", cloud="local") as dep:
        print(dep.base_url)
    run = train("lora", "./chats.json", base_model="./my-model", cloud="local")
    run.status()  # "SUCCEEDED"
"""

from __future__ import annotations

import io

from llm_atc import ui
from llm_atc.app import adapters, launch, lifecycle
from llm_atc.app import evaluate as app
from llm_atc.app.lifecycle import reconcile
from llm_atc.app.serve import build_spec, prepare
from llm_atc.deployment import Deployment
from llm_atc.errors import NotFoundError
from llm_atc.handle import RecordHandle
from llm_atc.registry import Registry


def serve(
    name: str | list[str],
    *,
    cloud: str | None = None,
    accelerator: str | None = None,
    timeout: float | None = None,
    quiet: bool = True,
    **options,
) -> Deployment:
    """Serve ``name`` (Hub id, ``llm-atc/<run>`` or folder; a list serves several models behind one
    endpoint) and wait until it answers.

    ``options`` are the CLI's ``serve`` options by their Python names (``source``,
    ``cluster``, ``region``, ``envs``, ``secrets``, ``port``, ``engine``,
    ``max_model_len``, ``vllm_args``, ...). Raises :class:`llm_atc.UserError`.
    """

    registry = Registry()
    with ui.quiet(quiet):
        spec = build_spec(
            name=name, cloud=cloud, accelerator=accelerator, timeout=timeout, registry=registry, **options
        )
        record = launch.serve(prepare(spec, registry=registry), registry=registry)
    return Deployment(record, registry)


def train(
    model_type: str,
    finetune_data: str,
    *,
    checkpoint_bucket: str | None = None,
    checkpoint_store: str | None = None,
    cloud: str | None = None,
    keep_cluster: bool = False,
    quiet: bool = True,
    **options,
) -> TrainingRun:
    """Fine-tune (``vicuna``, ``lora`` or ``qlora``) on ``finetune_data`` and wait for the run to end
    (unless ``detach_run=True``); returns its :class:`TrainingRun`.

    ``options`` are the CLI's ``train`` options by their Python names (``name``, ``base_model``,
    ``accelerator``, ``cpus``, ``region``, ``envs``, ``secrets``, ``resume``, ...). Raises
    :class:`llm_atc.UserError` (a failed run raises its subclass ``LaunchError``).
    """
    from llm_atc.app.train import build_spec, prepare, serve_when_done

    registry = Registry()
    with ui.quiet(quiet):
        spec = build_spec(
            registry=registry,
            model_type=model_type,
            finetune_data=finetune_data,
            cloud=cloud,
            checkpoint_bucket=checkpoint_bucket,
            checkpoint_store=checkpoint_store,
            **options,
        )
        prepared = prepare(spec, registry=registry, keep_cluster=keep_cluster)
        record = launch.train(prepared, registry=registry)
        serve_when_done(prepared.spec, registry)  # serve_on=DEPLOYMENT: the adapter answers there on return
    return TrainingRun(record, registry)


def evaluate(
    deployment: str,
    *,
    models: list[str] | None = None,
    data: str | None = None,
    run: str | None = None,
    limit: int | None = None,
    timeout: float | None = None,
    per_token: bool | None = None,
    quiet: bool = True,
):
    """``llm-atc eval``: score the models a running vLLM deployment serves on held-out conversations (``data``: a
    file or bucket URI; ``run``: ``llm-atc/<run>``'s held-out share; default: that of the run it serves). Returns
    an :class:`llm_atc.app.evaluate.Evaluation` (``.scores[name].nll``, ``.details()``)."""

    with ui.quiet(quiet):
        return app.evaluate_deployment(
            deployment,
            registry=Registry(),
            models=models,
            data=data,
            run=run,
            limit=limit or app.DEFAULT_LIMIT,
            timeout=timeout or app.DEFAULT_TIMEOUT,
            per_token=per_token,
        )


def promote(
    run: str,
    *,
    on: str,
    name: str,
    min_gain: float = 0.0,
    force: bool = False,
    data: str | None = None,
    data_run: str | None = None,
    blue_green: bool = False,
    secrets: dict[str, str] | None = None,
    per_token: bool | None = None,
    quiet: bool = True,
):
    """``llm-atc promote``: serve ``run`` as ``name`` on deployment ``on`` if it scores better (by ``min_gain``
    nats/token over the whole 95% interval) on held-out data, with no failed request. Returns a
    :class:`llm_atc.app.promote.Promotion`; raises :class:`llm_atc.UserError` (nothing changed) when it is not
    better."""
    from llm_atc.app import promote as app

    with ui.quiet(quiet):
        return app.promote(
            run,
            on=on,
            name=name,
            registry=Registry(),
            min_gain=min_gain,
            force=force,
            data=data,
            data_run=data_run,
            blue_green=blue_green,
            secrets=secrets,
            per_token=per_token,
        )


def rollback(*, on: str, name: str, secrets: dict[str, str] | None = None, quiet: bool = True):
    """``llm-atc promote --rollback``: ``name`` on ``on`` serves the version it served before."""
    from llm_atc.app import promote as app

    with ui.quiet(quiet):
        return app.rollback(on=on, name=name, registry=Registry(), secrets=secrets)


def get(name: str) -> Deployment | TrainingRun:
    """The newest deployment called ``name`` (or on cluster ``name``), else the training run ``name``."""

    registry = Registry()
    try:
        return Deployment(registry.find(name, kind="serve"), registry)
    except NotFoundError:
        pass
    try:
        return TrainingRun(registry.find(name, kind="train"), registry)
    except NotFoundError:
        raise NotFoundError(f"no deployment or training run named {name!r}; see `llm-atc status`") from None


def list_all() -> list[Deployment | TrainingRun]:
    """Every recorded deployment and training run, newest first (``llm_atc.list()``), reconciled."""

    registry = Registry()
    records = registry.records()
    reconcile(records, registry)
    return [Deployment(r, registry) if r.kind == "serve" else TrainingRun(r, registry) for r in records]


def list_deployments() -> list[Deployment]:
    """Every recorded deployment, newest first."""
    return [item for item in list_all() if isinstance(item, Deployment)]


class TrainingRun(RecordHandle):
    """A fine-tuning run (serve it as ``llm-atc/<name>``): its status, checkpoint and logs;
    ``serve()`` turns it into a deployment, ``stop()`` cancels it (``train(..., resume=True)`` goes on)."""

    @property
    def checkpoint_uri(self) -> str | None:
        """Where the servable model goes: ``<bucket>/llm-atc/<run>`` (or a local folder)."""
        return self.record.checkpoint_uri

    def logs(self) -> str:
        """The training log so far."""

        buffer = io.StringIO()
        lifecycle.logs(self.record, follow=False, registry=self._registry, output=buffer)
        return buffer.getvalue()

    def serve_on(self, deployment) -> None:
        """Load this run's adapter into a running deployment (a name or a Deployment), where it answers
        as ``llm-atc/<name>`` next to the base model. The run must have ended SUCCEEDED with ``MERGE=0``."""

        target = deployment if isinstance(deployment, str) else deployment.cluster
        adapters.serve_run_on(self.name, target, self._registry)

    def serve(self, **options):
        """Serve the trained model (``llm_atc.serve("llm-atc/<name>", **options)``); returns a Deployment."""
        return serve(f"llm-atc/{self.name}", **options)
