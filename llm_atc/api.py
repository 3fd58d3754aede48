"""The Python API: the same operations as the CLI, returning objects instead of printing.

    from llm_atc import serve
    with serve("./my-model", cloud="local") as dep:
        print(dep.base_url)
"""

from __future__ import annotations

from llm_atc import ui
from llm_atc.deployment import Deployment
from llm_atc.registry import Registry
from llm_atc.spec import build_serve_spec


def serve(
    name: str,
    *,
    cloud: str | None = None,
    accelerator: str | None = None,
    timeout: float | None = None,
    quiet: bool = True,
    **options,
) -> Deployment:
    """Serve ``name`` (Hub id, ``llm-atc/<run>`` or folder) and wait until it answers.

    ``options`` are the CLI's ``serve`` options by their Python names (``source``,
    ``cluster``, ``region``, ``envs``, ``secrets``, ``port``, ``engine``,
    ``max_model_len``, ``vllm_args``, ...). Raises :class:`llm_atc.UserError`.
    """
    from llm_atc import serving

    registry = Registry()
    with ui.quiet(quiet):
        spec = build_serve_spec(name, cloud=cloud, accelerator=accelerator, registry=registry, **options)
        if spec.is_local:
            from llm_atc.backends.local import serve_locally

            record = serve_locally(spec, timeout=timeout, registry=registry)
        else:
            prepared = serving.prepare(spec)
            record = serving.launch_on_skypilot(
                prepared, registry=registry, timeout=timeout or serving.CLOUD_READY_TIMEOUT
            )
    return Deployment(record, registry)


def get(name: str) -> Deployment:
    """The newest deployment called ``name`` (or on cluster ``name``)."""
    registry = Registry()
    return Deployment(registry.find(name, kind="serve"), registry)


def list_deployments() -> list[Deployment]:
    """Every recorded deployment, newest first."""
    registry = Registry()
    return [Deployment(record, registry) for record in registry.records(kind="serve")]
