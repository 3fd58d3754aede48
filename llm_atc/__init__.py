"""llm-atc: fine-tune and serve open LLMs on your own cloud account through SkyPilot.

The Python API mirrors the CLI::

    import llm_atc
    with llm_atc.serve("Qwen/Qwen2.5-0.5B-Instruct", cloud="local") as dep:
        print(dep.base_url)
    run = llm_atc.train("lora", "./chats.json", base_model="./my-model", cloud="local")
    llm_atc.list()  # deployments and training runs, newest first
    llm_atc.evaluate("my-llm", run="llm-atc/my-run")  # held-out loss of what it serves
    llm_atc.promote("llm-atc/my-run", on="my-llm", name="support")  # only if it is better

Heavy modules (SkyPilot, torch, transformers) load only when used.
"""

__version__ = "0.2.0"

__all__ = [
    "serve",
    "train",
    "evaluate",
    "promote",
    "rollback",
    "get",
    "list",
    "list_deployments",
    "Deployment",
    "TrainingRun",
    "UserError",
    "__version__",
]


def __getattr__(name):
    if name in ("serve", "train", "evaluate", "promote", "rollback", "get", "list_deployments"):
        from llm_atc import api

        return getattr(api, name)
    if name == "list":  # llm_atc.list(): deployments and runs (the module keeps the builtin for itself)
        from llm_atc import api

        return api.list_all
    if name == "Deployment":
        from llm_atc.deployment import Deployment

        return Deployment
    if name == "TrainingRun":
        from llm_atc.api import TrainingRun

        return TrainingRun
    if name == "UserError":
        from llm_atc.errors import UserError

        return UserError
    raise AttributeError(f"module 'llm_atc' has no attribute {name!r}")
