"""Bounded readiness polling of an OpenAI-compatible server, and endpoint snippets."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from llm_atc import ui
from llm_atc.errors import LaunchError

# Where each engine says it is ready: vLLM answers /v1/models once the model is
# loaded; `transformers serve` answers /health (its /v1/models can fail for local paths).
READY_PATHS = {"vllm": "/v1/models", "transformers": "/health"}


class EngineExited(LaunchError):
    """The engine stopped before it became ready."""


class FirstRequestFailed(LaunchError):
    """A model did not answer a request of its kind as it should; ``status`` is the HTTP status (0: none)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def trusting(cafile: str | None):
    """An SSL context for our own checks of an endpoint serving the certificate ``cafile`` (pinned: the
    chain must lead to that file; the host name is not checked, as a node's address rarely is in it)."""
    import ssl

    if not cafile:
        return None
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def probe(
    url: str, *, timeout: float = 5.0, api_key: str | None = None, cafile: str | None = None
) -> tuple[int, bytes]:
    """GET ``url``; returns ``(status, body)``, status 0 when nothing answered."""
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=trusting(cafile)) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read() or b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def wait_ready(
    base_url: str | Callable[[], str | None],
    *,
    engine: str,
    timeout: float,
    message: str,
    check_alive: Callable[[], str | None] = lambda: None,
    interval: float = 1.0,
    api_key: str | None = None,
    cafile: str | None = None,
) -> float:
    """Poll until the engine answers 200; returns the seconds waited.

    ``base_url`` may be a callable for endpoints not known yet (returns None until
    then). ``check_alive`` returns a reason string once the engine has died.
    Raises :class:`EngineExited` or :class:`LaunchError` on timeout.
    """
    path = READY_PATHS.get(engine, "/v1/models")
    start = time.monotonic()
    with ui.spinner(message) as spinner:
        while True:
            elapsed = time.monotonic() - start
            dead = check_alive()
            if dead:
                raise EngineExited(dead)
            url = base_url() if callable(base_url) else base_url
            if url:
                status, _ = probe(
                    url.rstrip("/") + path, timeout=min(5.0, interval + 4), api_key=api_key, cafile=cafile
                )
                if status == 200:
                    return time.monotonic() - start
                if status == 401:
                    raise LaunchError(
                        f"{url} is up but refuses {'our API key' if api_key else 'requests without an API key'} (401)"
                    )
                if status == 404:  # engines answer HTTP only once loaded: the server is up, the path is wrong
                    raise LaunchError(
                        f"{url} answers 404 on {path}: it is not a {engine} server, or not this version's"
                    )
                spinner.update(elapsed, f"{path} -> {status or 'no answer'}")
            else:
                spinner.update(elapsed, "waiting for the endpoint")
            if elapsed > timeout:
                raise LaunchError(f"the engine was not ready after {timeout:.0f}s")
            time.sleep(interval)


def served_models(
    base_url: str, engine: str = "vllm", name: str = "", api_key: str | None = None, cafile: str | None = None
) -> list[str]:
    """Model ids from ``GET /v1/models``; raises LaunchError when it does not answer.

    `transformers serve` serves one preloaded model (``name``) and lists only its
    Hub cache there, so it is checked through ``/health`` instead.
    """
    if engine == "transformers":
        status, _ = probe(base_url.rstrip("/") + "/health", cafile=cafile)
        if status != 200:
            raise LaunchError(f"{base_url}/health answered {status or 'nothing'}")
        return [name]
    status, body = probe(base_url.rstrip("/") + "/v1/models", api_key=api_key, cafile=cafile)
    if status == 401:
        what = "refuses the API key llm-atc has for it" if api_key else "needs its API key"
        raise LaunchError(
            f"this endpoint {what} (401 Unauthorized): {base_url}; "
            "send `Authorization: Bearer <key>`, the key from `llm-atc endpoint NAME --show_key`"
        )
    if status != 200:
        raise LaunchError(f"{base_url}/v1/models answered {status or 'nothing'}")
    try:
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise LaunchError(f"{base_url}/v1/models did not return an OpenAI model list") from None


def post_json(
    url: str, body: dict, *, api_key: str | None = None, cafile: str | None = None, timeout: float = 60.0
) -> tuple[int, object]:
    """POST ``body`` as JSON; ``(status, parsed answer)``, status 0 when nothing answered."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=trusting(cafile)) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read() or b""
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# One small real request of each task, and how to read its answer.
_PROBES = {
    "generate": ("/v1/completions", lambda m: {"model": m, "prompt": "Hello", "max_tokens": 1}),
    "embed": ("/v1/embeddings", lambda m: {"model": m, "input": ["Hello"]}),
    "rerank": ("/v1/rerank", lambda m: {"model": m, "query": "Hello", "documents": ["Hello", "Goodbye"]}),
    "classify": ("/classify", lambda m: {"model": m, "input": ["Hello"]}),
}


def try_model(
    base_url: str, model: str, task: str, *, engine: str = "vllm", api_key: str | None = None, cafile: str | None = None
) -> str:
    """Send ``model`` one real request of its task; what it answered, in a few words. Raises LaunchError
    when it does not answer as it should."""
    path, body = _PROBES.get(task, _PROBES["generate"])
    body = body(model)
    if engine == "transformers":  # transformers serve: chat only
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        body["max_tokens"] = 1
    status, answer = post_json(base_url.rstrip("/") + path, body, api_key=api_key, cafile=cafile)
    if status != 200 or not isinstance(answer, dict):
        detail = answer.get("error", answer) if isinstance(answer, dict) else answer
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        raise FirstRequestFailed(f"{model} answered {status or 'nothing'} on {path}: {str(detail)[:200]}", status)
    try:
        if task == "embed":
            return f"embeddings of {len(answer['data'][0]['embedding'])} dimensions"
        if task == "rerank":
            return f"reranks ({len(answer['results'])} scores for 2 documents)"
        if task == "classify":
            return f"classifies ({answer['data'][0]['num_classes']} labels)"
        return "generates (1 token)" if answer["choices"] else "generates"
    except (KeyError, IndexError, TypeError):
        raise FirstRequestFailed(f"{model} answered {path} with an unexpected body: {str(answer)[:200]}", 200) from None


# Answers to a first request that a busy or restarting path gives (a load balancer's 502-504, throttling):
# asked again, up to FIRST_REQUEST_TRIES times, before the engine is called broken.
TRANSIENT = {0, 408, 429, 502, 503, 504}
FIRST_REQUEST_TRIES = 5


def first_answers(base_url: str, record, *, api_key: str | None = None, pause: float = 3.0) -> None:
    """Ready means answering: each model the deployment serves gets one real request of its kind (a 1-token
    completion, an embedding, ...). An engine that lists its models but cannot run them (a kernel this
    hardware lacks, say) raises :class:`EngineExited` here, at launch, not at its first user's request."""
    for name in record.served:
        for attempt in range(FIRST_REQUEST_TRIES):
            try:
                try_model(
                    base_url,
                    name,
                    record.task_of(name),
                    engine=record.engine or "vllm",
                    api_key=api_key,
                    cafile=record.details.get("tls_cert"),
                )
                break
            except FirstRequestFailed as exc:
                if exc.status not in TRANSIENT or attempt == FIRST_REQUEST_TRIES - 1:
                    raise EngineExited(f"the engine is up but failed its first request: {exc}") from None
                time.sleep(pause)


API_KEY_ENV = "LLM_ATC_API_KEY"


def snippets(
    base_url: str,
    model: str,
    engine: str = "vllm",
    *,
    task: str = "generate",
    key_for: str | None = None,
    cafile: str | None = None,
) -> str:
    """The base URL, a curl and a short Python snippet for ``task`` (chat, embeddings, rerank or
    classification), as printed after serve.

    ``key_for``: the cluster whose endpoint needs an API key; the snippets read it from
    ``$LLM_ATC_API_KEY`` (never printed here) and say how to set it. ``cafile``: the certificate an
    HTTPS endpoint serves, for clients to trust (curl's --cacert, httpx's SSL_CERT_FILE).
    """
    base = base_url.rstrip("/")
    api = base + "/v1"
    header = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if key_for else ""
    header += f" --cacert {cafile}" if cafile else ""
    export = f"  export {API_KEY_ENV}=$(llm-atc endpoint {key_for} --show_key)\n" if key_for else ""
    export += (
        f"  export SSL_CERT_FILE={cafile}  # the openai client trusts the endpoint's certificate\n" if cafile else ""
    )
    key = f'os.environ["{API_KEY_ENV}"]' if key_for else '"EMPTY"'
    name = json.dumps(model)

    def curl(path: str, body: dict) -> str:
        return f"curl {path} -H 'Content-Type: application/json'{header} -d '{json.dumps(body)}'"

    if task in ("rerank", "classify"):  # not in OpenAI's API: plain HTTP
        if task == "rerank":
            path, body = f"{api}/rerank", {"model": model, "query": "What is llm-atc?", "documents": DOCUMENTS}
            show = '[(r["index"], round(r["relevance_score"], 3)) for r in reply.json()["results"]]'
        else:
            path, body = f"{base}/classify", {"model": model, "input": ["llm-atc serves models."]}
            show = '[item["label"] for item in reply.json()["data"]]'
        auth = f'"Authorization": "Bearer " + {key}' if key_for else ""
        imports = "import os, httpx" if key_for else "import httpx"
        return f"""Endpoint: {api}

{export}  {curl(path, body)}

  {imports}
  reply = httpx.post("{path}", headers={{{auth}}}, json={json.dumps(body)})
  print({show})
"""
    imports = "import os\n  from openai import OpenAI" if key_for else "from openai import OpenAI"
    client = f'client = OpenAI(base_url="{api}", api_key={key})'
    if task == "embed":
        return f"""Endpoint: {api}

{export}  {curl(f"{api}/embeddings", {"model": model, "input": ["Hello!"]})}

  {imports}
  {client}
  reply = client.embeddings.create(model={name}, input=["Hello!", "How are you?"])
  print(len(reply.data), "vectors of", len(reply.data[0].embedding))
"""
    if engine == "vllm":
        first = f"curl {api}/models{header}"
    else:  # `transformers serve` lists only its Hub cache under /v1/models
        body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
        first = curl(f"{api}/chat/completions", body)
    return f"""Endpoint: {api}

{export}  {first}

  {imports}
  {client}
  reply = client.chat.completions.create(
      model={name}, messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=64)
  print(reply.choices[0].message.content)
"""


DOCUMENTS = ["llm-atc serves models on your own cloud.", "Bananas are yellow."]
