"""The Python handle on one deployment, shared by every backend."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

from llm_atc import credentials
from llm_atc.app import adapters, lifecycle
from llm_atc.errors import LaunchError, UserError
from llm_atc.handle import RecordHandle
from llm_atc.readiness import post_json, wait_ready


class Deployment(RecordHandle):
    """A served model: its endpoint, live status, logs and lifecycle. ``name`` is what
    clients send as ``model``.

    As a context manager it stops a local deployment on exit and tears a cloud
    one down (so nothing keeps billing).
    """

    @property
    def endpoint(self) -> str:
        """``http://HOST:PORT`` of the engine."""
        if not self.record.endpoint:
            return lifecycle.endpoint(self.record, registry=self._registry)[1]
        return self.record.endpoint

    @property
    def models(self) -> list[str]:
        """Every model the endpoint serves, by the name clients send (several with ``serve([A, B])``)."""
        return self.record.served

    @property
    def api_key(self) -> str | None:
        """The endpoint's API key (send it as ``Authorization: Bearer``), or None when it has none."""

        return credentials.get(self.cluster)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://HOST:PORT/v1``."""
        return self.endpoint.rstrip("/") + "/v1"

    @property
    def task(self) -> str:
        """What the (first) model serves: ``generate`` (chat, completions), ``embed``, ``rerank`` or ``classify``."""
        return self.record.task_of()

    def client(self, **kwargs):
        """An ``openai.OpenAI`` client for this endpoint: its base URL, its API key and, for HTTPS, its
        certificate (needs the ``openai`` package)."""
        try:
            import httpx
            from openai import OpenAI
        except ImportError:
            from llm_atc.errors import UserError

            raise UserError("Deployment.client() needs the openai package: pip install openai") from None
        if self._cafile and "http_client" not in kwargs:
            kwargs["http_client"] = httpx.Client(verify=self._cafile)
        return OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", **kwargs)

    def embed(self, texts: str | list[str], *, model: str | None = None) -> list[list[float]]:
        """One embedding vector per text (``/v1/embeddings``), in order."""
        inputs = [texts] if isinstance(texts, str) else list(texts)
        answer = self._post("embed", "/v1/embeddings", {"input": inputs}, model)
        return [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]

    def rerank(
        self, query: str, documents: list[str], *, model: str | None = None, top_n: int | None = None
    ) -> list[tuple[int, float]]:
        """``(document index, relevance score)`` per document, most relevant first (``/v1/rerank``)."""
        body = {"query": query, "documents": list(documents), **({"top_n": top_n} if top_n else {})}
        answer = self._post("rerank", "/v1/rerank", body, model)
        return [(item["index"], item["relevance_score"]) for item in answer["results"]]

    def classify(self, texts: str | list[str], *, model: str | None = None) -> list[dict]:
        """Per text, its ``label`` and the ``probs`` of every label (``/classify``)."""
        inputs = [texts] if isinstance(texts, str) else list(texts)
        answer = self._post("classify", "/classify", {"input": inputs}, model)
        return [{"label": item["label"], "probs": item["probs"]} for item in answer["data"]]

    def _post(self, task: str, path: str, body: dict, model: str | None) -> dict:

        name = model or next((m for m in self.models if self.record.task_of(m) == task), self.name)
        if self.record.task_of(name) != task:
            raise UserError(f"{name} is served for {self.record.task_of(name)}, not {task}")
        url = self.endpoint.rstrip("/") + path
        status, answer = post_json(url, {"model": name, **body}, api_key=self.api_key, cafile=self._cafile)
        if status != 200 or not isinstance(answer, dict):
            raise LaunchError(f"{url} answered {status or 'nothing'}: {str(answer)[:300]}")
        return answer

    @property
    def _cafile(self) -> str | None:
        return self.record.details.get("tls_cert")

    def logs(self) -> str:
        """The engine's log so far."""
        buffer = io.StringIO()
        lifecycle.logs(self.record, follow=False, registry=self._registry, output=buffer)
        return buffer.getvalue()

    def wait_ready(self, timeout: float = 600) -> float:
        """Block until the engine answers; returns the seconds waited."""
        return wait_ready(
            lambda: self.endpoint,
            engine=self.record.engine or "vllm",
            timeout=timeout,
            message=f"Waiting for {self.name}",
            api_key=self.api_key,
            cafile=self._cafile,
        )

    @contextmanager
    def forward(self, local_port: int | None = None) -> Iterator[str]:
        """An SSH tunnel to the engine, for nodes this machine cannot reach directly; yields the
        local OpenAI base URL (``http://127.0.0.1:PORT/v1``) and closes the tunnel on exit.

            with dep.forward() as base_url:
                OpenAI(base_url=base_url, api_key="-").chat.completions.create(...)
        """

        with lifecycle.forward(self.record, local_port=local_port) as tunnel:
            yield tunnel.base_url

    def add_adapter(self, name: str, ref: str, envs: dict[str, str] | None = None) -> None:
        """Load LoRA adapter ``ref`` (llm-atc/<run>, s3://, gs://, a folder, a Hub id) into the running
        engine; it answers as model ``name`` when this returns (`llm-atc adapters add`). ``envs``: bucket
        settings and keys for a bucket adapter."""

        record = adapters.deployment(self.cluster, self._registry)
        checked = adapters.check_adapter(record, name, ref, self._registry, envs)
        self.record = adapters.add(record, checked, self._registry, envs)

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name`` from the running engine (`llm-atc adapters remove`)."""

        self.record = adapters.remove(adapters.deployment(self.cluster, self._registry), name, self._registry)

    def adapters(self) -> list[str]:
        """The adapter names the engine answers to now, besides its base model."""

        record = adapters.deployment(self.cluster, self._registry)
        return [name for name, _ in adapters.listing(record, self._registry)]

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.record.is_local:
            self.stop()
        else:
            self.down()
