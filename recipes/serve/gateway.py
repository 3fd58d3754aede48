"""Several models behind one endpoint, on the node: one vLLM per model, vLLM's router, and this gateway.

    python3 gateway.py --host HOST --port PORT --router URL [--sequential] [--ssl-certfile F --ssl-keyfile F]
        --engines '{"engines": [[argv...], ...], "router": [argv...]}'

The engines listen on 127.0.0.1. vLLM's router (``--enable-igw``) routes each request by its ``model``
to the engine registered under that name. The router has no client authentication, serves its worker
admin API (``/workers``) on the same port and lists models in a format of its own, so it listens on
127.0.0.1 too, and this gateway is what clients reach: it checks the API key (``VLLM_API_KEY``, the
engines' own) on every request, answers ``GET /v1/models`` with every engine's models (OpenAI's
format), refuses an unknown ``model`` with a 404 naming the served ones, and passes the OpenAI API
(``/v1/...``) to the router, streams included; rerank, score, classification and tokenizer requests, which
the router does not route by model, go straight to the engine of their ``model``; ``GET /metrics?model=NAME`` gives
that engine's Prometheus metrics.

Engines that share a device (``--sequential``) start one after another: vLLM sizes its memory from
what is free when it starts. When any engine or the router exits, the others are stopped and this
program exits non-zero. SIGTERM or SIGINT stops everything. Needs aiohttp (vLLM depends on it).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import ssl
import sys
import time

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HEALTH_TIMEOUT = 3600  # seconds an engine may take to load (the client's own readiness wait bounds it too)
ROUTER_TIMEOUT = 60
STOP_GRACE = 20
# Paths the gateway passes to the router; everything else of the router's (its admin API) stays private.
POST_PATHS = ("/v1/",)
# Paths the router does not route by model (vllm-router 0.1.17 answers "No available workers"): the gateway
# sends them to the engine of the request's model itself. Rerank, score and classification are the
# pooling models' own; the tokenizer's paths belong to each model.
DIRECT_PATHS = frozenset(
    {"/v1/rerank", "/v1/score", "/rerank", "/v2/rerank", "/score", "/classify", "/pooling", "/v2/embed"}
    | {"/tokenize", "/detokenize"}
)
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"})


def log(message: str) -> None:
    print(f"llm-atc: {message}", flush=True)


def flag(argv: list[str], name: str) -> str:
    """The value of ``name`` in an engine's command line."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise SystemExit(f"llm-atc: the engine command has no {name}: {' '.join(argv)}")


class Engine:
    """One child process: an engine or the router, its output prefixed with its name."""

    def __init__(self, name: str, argv: list[str], url: str, env: dict[str, str]):
        self.name, self.argv, self.url, self.env = name, argv, url, env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env
        )
        asyncio.get_running_loop().create_task(self._relay())

    async def _relay(self) -> None:
        while line := await self.process.stdout.readline():
            sys.stdout.write(f"[{self.name}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    @property
    def exited(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait_healthy(self, session: ClientSession, timeout: float) -> None:
        """Until ``GET /health`` answers 200; exits when the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited is not None:
                raise Failed(f"{self.name} exited with code {self.exited} before it was ready")
            try:
                async with session.get(self.url + "/health", timeout=ClientTimeout(total=5)) as response:
                    if response.status == 200:
                        log(f"{self.name} is ready on {self.url}")
                        return
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(1)
        raise Failed(f"{self.name} was not ready after {timeout:.0f}s")

    async def stop(self) -> None:
        if self.process is None or self.exited is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


class Failed(Exception):
    """Something the gateway depends on did not start, or stopped."""


def error(status: int, message: str, kind: str) -> web.Response:
    """An error in OpenAI's format, as vLLM writes it."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class Gateway:
    """The client-facing server: API key, the model list, unknown models, and the path to the router."""

    def __init__(self, engines: list[Engine], router: str, api_key: str):
        self.engines, self.router, self.api_key = engines, router.rstrip("/"), api_key
        self.names = [engine.name for engine in engines]
        self.session: ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.authorize], client_max_size=512 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        self.session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False, timeout=ClientTimeout())

    async def _close(self, app) -> None:
        await self.session.close()

    @web.middleware
    async def authorize(self, request: web.Request, handler):
        if self.api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        down = [engine.name for engine in self.engines if engine.exited is not None]
        return web.Response(status=503 if down else 200, text=f"down: {', '.join(down)}" if down else "")

    async def models(self, request: web.Request) -> web.Response:
        """Every engine's ``/v1/models``, one OpenAI list."""
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        data = []
        for engine in self.engines:
            try:
                async with self.session.get(engine.url + "/v1/models", headers=headers) as response:
                    if response.status != 200:
                        return error(
                            503, f"{engine.name} answered {response.status} on /v1/models", "ServiceUnavailable"
                        )
                    data += (await response.json())["data"]
            except (OSError, ValueError, KeyError) as exc:
                return error(503, f"{engine.name} did not list its models ({type(exc).__name__})", "ServiceUnavailable")
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics?model=NAME``: that engine's Prometheus metrics (``llm-atc top``, Prometheus), behind the key
        like everything here; the engines' own ports stay on 127.0.0.1."""
        model = request.query.get("model")
        if model not in self.names:
            served = ", ".join(self.names)
            return error(404, f"give ?model= one of the models this endpoint serves: {served}", "NotFoundError")
        engine = self.engines[self.names.index(model)]
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        try:
            async with self.session.get(engine.url + "/metrics", headers=headers) as response:
                text = await response.text()
                return web.Response(status=response.status, text=text, content_type="text/plain")
        except OSError as exc:
            return error(503, f"{model} did not give its metrics ({type(exc).__name__})", "ServiceUnavailable")

    async def forward(self, request: web.Request) -> web.StreamResponse:
        direct = request.path in DIRECT_PATHS
        if request.method != "POST" or not (direct or request.path.startswith(POST_PATHS)):
            return error(404, f"{request.method} {request.path} is not served here", "NotFoundError")
        body = await request.read()
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return error(400, "the request body is not a JSON object", "BadRequestError")
        if model not in self.names:
            served = ", ".join(self.names)
            return error(404, f"The model `{model}` does not exist. This endpoint serves: {served}.", "NotFoundError")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        target = self.engines[self.names.index(model)].url if direct else self.router
        async with self.session.post(target + request.path_qs, data=body, headers=headers) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


async def register(session: ClientSession, router: str, engine: Engine) -> None:
    """Tell the router which model the engine serves (it would look it up without the API key)."""
    worker = {"url": engine.url, "model_id": engine.name}
    async with session.post(router.rstrip("/") + "/workers", json=worker) as response:
        if response.status != 200:
            raise Failed(f"the router refused {engine.name} ({response.status}: {(await response.text())[:200]})")


def engine_env(count: int) -> dict[str, str]:
    """Each engine's environment: on the CPU build, its share of the node's KV cache."""
    env = dict(os.environ)
    total = env.get("VLLM_CPU_KVCACHE_SPACE")
    if total:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(total) // count))
    return env


async def run(args) -> int:
    spec = json.loads(args.engines)
    env = engine_env(len(spec["engines"]))
    engines = [
        Engine(flag(argv, "--served-model-name"), argv, f"http://127.0.0.1:{flag(argv, '--port')}", env)
        for argv in spec["engines"]
    ]
    router = Engine("router", spec["router"], args.router.rstrip("/"), dict(os.environ))
    children = [*engines, router]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    runner = None
    try:
        async with ClientSession() as session:
            starting = asyncio.gather(*(_start(engine, session, args.sequential, engines) for engine in engines))
            await _until(starting, stopping)
            await router.start()
            await _until(router.wait_healthy(session, ROUTER_TIMEOUT), stopping)
            for engine in engines:
                await register(session, args.router, engine)
        runner = web.AppRunner(Gateway(engines, args.router, os.environ.get("VLLM_API_KEY", "")).app())
        await runner.setup()
        context = None
        if args.ssl_certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        await web.TCPSite(runner, args.host, args.port, ssl_context=context).start()
        log(f"serving {', '.join(e.name for e in engines)} on {args.host}:{args.port} through vLLM's router")
        # Polled: an engine's own children (vLLM's engine core) keep its output pipe open after it dies,
        # and asyncio's Process.wait() waits for the pipe too (Python 3.11).
        while not stopping.is_set():
            gone = next((c for c in children if c.exited is not None), None)
            if gone is not None:
                raise Failed(f"{gone.name} exited with code {gone.exited}")
            _seen.update(_descendants())
            await asyncio.sleep(1)
        log("stopping")
        return 0
    except Failed as exc:
        log(f"{exc}; stopping the others")
        return 1
    except Stopped:
        log("stopping")
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        _seen.update(_descendants())
        await asyncio.gather(*(child.stop() for child in children))
        _end(_seen)


_seen: dict = {}  # every descendant seen while running, so that none outlives the gateway


def _descendants() -> dict:
    """Every process below this one, by (pid, start time): an engine's children outlive it when it is killed."""
    try:
        import psutil  # vLLM depends on it
    except ImportError:
        return {}
    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            found[(process.pid, process.create_time())] = process
        except psutil.Error:
            continue
    return found


def _end(processes: dict) -> None:
    """Terminate, then kill, what is left of ``processes`` (those still the same processes)."""
    if not processes:
        return
    import psutil

    alive = []
    for (_, started), process in processes.items():
        try:
            if process.create_time() == started and process.is_running():
                process.terminate()
                alive.append(process)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=STOP_GRACE)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            continue


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while starting."""


async def _until(awaitable, stopping: asyncio.Event):
    """Await ``awaitable`` unless a stop signal comes first."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.create_task(stopping.wait())
    await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not task.done():
        task.cancel()
        raise Stopped
    return task.result()


_turn = asyncio.Lock()


async def _start(engine: Engine, session: ClientSession, sequential: bool, engines: list[Engine]) -> None:
    """Start one engine and wait until it answers (one at a time when they share a device)."""
    if not sequential:
        await engine.start()
        return await _healthy_while_all_run(engine, session, engines)
    async with _turn:
        await engine.start()
        await _healthy_while_all_run(engine, session, engines)


async def _healthy_while_all_run(engine: Engine, session: ClientSession, engines: list[Engine]) -> None:
    """Wait for ``engine``, but fail as soon as any started engine has exited."""
    waiting = asyncio.create_task(engine.wait_healthy(session, HEALTH_TIMEOUT))
    while not waiting.done():
        _seen.update(_descendants())
        dead = next((e for e in engines if e.exited is not None), None)
        if dead is not None:
            waiting.cancel()
            raise Failed(f"{dead.name} exited with code {dead.exited} before it was ready")
        await asyncio.sleep(0.5)
    waiting.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--router", required=True, help="the router's URL on this node")
    parser.add_argument("--engines", required=True, help="JSON: the engines' and the router's command lines")
    parser.add_argument("--sequential", action="store_true", help="start the engines one after another")
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
