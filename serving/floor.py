"""The plumbing floor: capaserve's HTTP and Ray Serve path with a constant in place of the model.

`loadtest/bench_floor.py` drives these servers to measure what a request costs before any
forward: how much CPU the HTTP server, Serve's replica and a deployment hop take per request
on this host, so the ratios a benchmark asks for (texts/s against the in-process ceiling)
can be checked against what the plumbing leaves for the forward. Each mode answers
POST /v1/embeddings like capaserve (the same request model and validation, the same orjson
rendering of numpy vectors), every input getting the same unit vector of `DIMENSIONS`:

- `fastapi`: one uvicorn process with the FastAPI app, no Ray: the least any Python
  server of this shape costs.
- `serve`: the same app as a Ray Serve ingress deployment on a local cluster, reached at the
  ingress replica's own port (direct ingress), with capaserve's Serve settings.
- `serve-hop`: that ingress calling a second deployment through a handle for the vectors,
  one call per request: the two deployments capaserve runs (without its coalescing, which
  joins concurrent requests into one call, so this is the hop's upper cost).

    python -m serving.floor --mode serve-hop --port 8000

Runs until SIGTERM or SIGINT; a Ray mode then stops its local cluster, Serve with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Response

from serving.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EncoderUsage, render
from serving.serve_embeddings import shape_vectors

#: MiniLM's embedding size: the response carries as many floats as capaserve's.
DIMENSIONS = 384
MODES = ("fastapi", "serve", "serve-hop")
APP_NAME = "capaserve-floor"

Answer = Callable[[list[str]], Awaitable[np.ndarray]]


def unit_vectors(n: int) -> np.ndarray:
    """n copies of one fixed unit vector (float32), what every input is answered with."""
    v = np.arange(1, DIMENSIONS + 1, dtype=np.float32)
    return np.tile(v / np.linalg.norm(v), (n, 1))


def floor_api(answer: Answer) -> FastAPI:
    """A FastAPI app whose /v1/embeddings validates and renders as capaserve's, vectors from `answer`."""
    api = FastAPI(title="capaserve plumbing floor")

    @api.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Response:
        texts = req.texts()
        vectors = shape_vectors(list(await answer(texts)), req.dimensions, req.encoding_format)
        tokens = sum(len(t.split()) for t in texts)
        body = EmbeddingResponse.model_construct(
            data=[EmbeddingData.model_construct(embedding=v, index=i) for i, v in enumerate(vectors)],
            model=req.model,
            usage=EncoderUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
        return Response(render(body), media_type="application/json")

    return api


async def _constant(texts: list[str]) -> np.ndarray:
    return unit_vectors(len(texts))


def _serve_app(mode: str) -> Any:
    """The Serve application of a Ray mode (built after `use_serve_env`, as Serve reads it on import)."""
    from ray import serve

    @serve.deployment(name="FloorModel", ray_actor_options={"num_cpus": 0})
    class FloorModel:
        async def embed(self, texts: list[str]) -> np.ndarray:
            return unit_vectors(len(texts))

    @serve.deployment(name="FloorIngress", ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class FloorIngress:
        def __init__(self, model: Any = None) -> None:
            self.model = model

        def __serve_build_asgi_app__(self) -> Any:
            if self.model is None:
                return floor_api(_constant)
            handle = self.model

            async def hop(texts: list[str]) -> np.ndarray:
                return await handle.embed.remote(texts)

            return floor_api(hop)

    return FloorIngress.bind(FloorModel.bind() if mode == "serve-hop" else None)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Stop(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.mode == "fastapi":
        import uvicorn

        uvicorn.run(floor_api(_constant), host=args.host, port=args.port, log_level="warning", access_log=False)
        return 0

    from serving.ray_local import ingress_on_port, init_local_ray, use_serve_env

    use_serve_env(ingress_on_port(args.port))
    init_local_ray(num_cpus=os.cpu_count() or 1)
    from ray import serve

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": _free_port(args.host)})  # the proxy: unused here
        serve.run(_serve_app(args.mode), name=APP_NAME, route_prefix="/")
        print(f"floor ({args.mode}) ready at http://{args.host}:{args.port}", flush=True)
        while True:
            signal.pause()
    except _Stop:
        pass
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        import ray

        ray.shutdown()  # a benchmark's cluster: nothing to drain, so Serve goes with Ray's processes
        sys.stdout.flush()
        os._exit(0)  # skip the interpreter's teardown of Ray's and gRPC's modules (seconds, nothing left to do)


if __name__ == "__main__":
    # Run from the importable module, not `__main__`: Serve pickles the deployments by reference
    # then, and the replicas import this module as it is instead of a by-value copy of its parts.
    from serving.floor import main as _main

    raise SystemExit(_main())
