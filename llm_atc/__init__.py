"""llm-atc: fine-tune and serve open LLMs on your own cloud account through SkyPilot.

The Python API mirrors the CLI::

    from llm_atc import serve
    with serve("Qwen/Qwen2.5-0.5B-Instruct", cloud="local") as dep:
        print(dep.base_url)

Heavy modules (SkyPilot, torch, transformers) load only when used.
"""

__version__ = "0.2.0"

__all__ = ["serve", "get", "list_deployments", "Deployment", "UserError", "__version__"]


def __getattr__(name):
    if name in ("serve", "get", "list_deployments"):
        from llm_atc import api

        return getattr(api, name)
    if name == "Deployment":
        from llm_atc.deployment import Deployment

        return Deployment
    if name == "UserError":
        from llm_atc.errors import UserError

        return UserError
    raise AttributeError(f"module 'llm_atc' has no attribute {name!r}")
