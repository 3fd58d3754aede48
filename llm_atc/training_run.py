"""The Python handle on one fine-tuning run."""

from __future__ import annotations

import io

from llm_atc.handle import RecordHandle


class TrainingRun(RecordHandle):
    """A fine-tuning run (serve it as ``llm-atc/<name>``): its status, checkpoint and logs;
    ``serve()`` turns it into a deployment, ``stop()`` cancels it (``train(..., resume=True)`` goes on)."""

    @property
    def checkpoint_uri(self) -> str | None:
        """Where the servable model goes: ``<bucket>/llm-atc/<run>`` (or a local folder)."""
        return self.record.checkpoint_uri

    def logs(self) -> str:
        """The training log so far."""
        from llm_atc.app import lifecycle

        buffer = io.StringIO()
        lifecycle.logs(self.record, follow=False, registry=self._registry, output=buffer)
        return buffer.getvalue()

    def serve_on(self, deployment) -> None:
        """Load this run's adapter into a running deployment (a name or a Deployment), where it answers
        as ``llm-atc/<name>`` next to the base model. The run must have ended SUCCEEDED with ``MERGE=0``."""
        from llm_atc.app import adapters

        target = deployment if isinstance(deployment, str) else deployment.cluster
        adapters.serve_run_on(self.name, target, self._registry)

    def serve(self, **options):
        """Serve the trained model (``llm_atc.serve("llm-atc/<name>", **options)``); returns a Deployment."""
        from llm_atc.api import serve

        return serve(f"llm-atc/{self.name}", **options)
