"""The API key on every path of vLLM's OpenAI server, as an ASGI middleware vLLM loads itself:

    PYTHONPATH=<this folder> python3 -m vllm.entrypoints.openai.api_server ... --middleware llm_atc_vllm_auth.RequireKey

vLLM's own check (``--api-key`` / ``VLLM_API_KEY``) guards only paths under /v1, /v2, /inference and /cohere.
Its other routes answer anyone: /invocations runs chat completions, completions and embeddings, and
/classify, /rerank, /score, /pooling, /tokenize and /metrics need no key either (vLLM 0.32). With this
middleware every request needs ``Authorization: Bearer $VLLM_API_KEY`` except ``GET /health``, which load
balancers and llm-atc's readiness checks ask without one. Without VLLM_API_KEY it lets everything through,
as vLLM does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

OPEN_PATHS = frozenset({"/health"})


class RequireKey:
    """Pure ASGI (no buffering): streaming responses and websockets pass through untouched."""

    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                given = hashlib.sha256(token.strip().encode()).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(given, self.digest)
        return False

    @staticmethod
    def _open(scope) -> bool:
        """``GET``/``HEAD /health``, and a browser's CORS preflight (which carries no credentials by design)."""
        method = scope.get("method")
        if scope["path"] in OPEN_PATHS:
            return method in ("GET", "HEAD")
        names = {name for name, _ in scope.get("headers") or ()}
        return method == "OPTIONS" and {b"origin", b"access-control-request-method"} <= names

    async def __call__(self, scope, receive, send):
        if (
            self.digest is None
            or scope["type"] not in ("http", "websocket")
            or self._open(scope)
            or self._authorized(scope)
        ):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": "Unauthorized"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
