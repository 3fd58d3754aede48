"""The Python handle on one fine-tuning run."""

from __future__ import annotations

import io
from pathlib import Path

from llm_atc.handle import RecordHandle
from llm_atc.registry import Status


class TrainingRun(RecordHandle):
    """A fine-tuning run (serve it as ``llm-atc/<name>``): its status, checkpoint and logs;
    ``serve()`` turns it into a deployment."""

    @property
    def checkpoint_uri(self) -> str | None:
        """Where the servable model goes: ``<bucket>/llm-atc/<run>`` (or a local folder)."""
        return self.record.checkpoint_uri

    def status(self) -> str:
        """LAUNCHING, RUNNING, SUCCEEDED or FAILED; a run on a cluster is asked about its job."""
        record = self.record
        if record.status in (Status.LAUNCHING, Status.RUNNING) and not record.is_local:
            from llm_atc.backends.skypilot import SkyPilotBackend

            ended = SkyPilotBackend().job_end(record)
            if ended is not None:
                self._registry.update(record, status=Status.SUCCEEDED if ended == "SUCCEEDED" else Status.FAILED)
            elif self._model_published():  # the cluster is gone (autodown) but the model is there
                self._registry.update(record, status=Status.SUCCEEDED)
        return self.record.status

    def _model_published(self) -> bool:
        from llm_atc.errors import UserError
        from llm_atc.storage import BucketURI, check_checkpoint

        if not self.checkpoint_uri or "://" not in self.checkpoint_uri:
            return False
        try:
            check_checkpoint(BucketURI.parse(self.checkpoint_uri))
        except UserError:
            return False
        return True

    def logs(self) -> str:
        """The training log so far."""
        if self.record.is_local:
            path = Path(self.record.details.get("log", ""))
            return path.read_text(errors="replace") if path.is_file() else ""
        from llm_atc.backends.skypilot import SkyPilotBackend

        buffer = io.StringIO()
        SkyPilotBackend().logs(self.record, follow=False, output=buffer)
        return buffer.getvalue()

    def serve(self, **options):
        """Serve the trained model (``llm_atc.serve("llm-atc/<name>", **options)``); returns a Deployment."""
        from llm_atc.api import serve

        return serve(f"llm-atc/{self.name}", **options)
