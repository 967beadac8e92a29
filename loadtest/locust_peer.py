"""Locust users for loadtest/bench_peer.py: OpenAI-style embeddings requests, nothing else.

Every server gets the same load: closed-loop users, no think time, each request carrying
`--texts-per-request` sentences drawn (seeded) from `peer_sentences()`, the same 200
sentences of 5-20 words for every server. A non-200 answer, or one without one vector
per input, is a failure. `--models a,b,c --zipf 1.0` draws each request's model from that
list with Zipf popularity (the first most popular): capaserve serving many adapters.

    locust -f loadtest/locust_peer.py --headless -u 32 -t 20s --host http://127.0.0.1:8000 \
        --model sentence-transformers/all-MiniLM-L6-v2 --texts-per-request 8
"""

from __future__ import annotations

import random

from locust import FastHttpUser, events, task

from loadtest.scenario import peer_sentences, zipf_weights


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # noqa: ANN001 - locust's parser
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model sent in every request")
    parser.add_argument("--texts-per-request", type=int, default=1, help="inputs per request")
    parser.add_argument("--seed", type=int, default=0, help="seeds each user's draw")
    parser.add_argument("--models", default="", help="comma-separated models drawn per request (overrides --model)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the --models draw")


class EmbeddingsUser(FastHttpUser):
    """One closed-loop client: a request, its answer, the next request."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.sentences = peer_sentences()
        self.rng = random.Random(opts.seed * 1_000_003 + id(self))
        self.n = opts.texts_per_request
        self.models = [m for m in opts.models.split(",") if m] or [opts.model]
        self.weights = zipf_weights(len(self.models), opts.zipf)

    @task
    def embed(self) -> None:
        texts = self.rng.sample(self.sentences, self.n)
        model = self.rng.choices(self.models, self.weights)[0]
        with self.client.post(
            "/v1/embeddings", json={"model": model, "input": texts}, name="/v1/embeddings", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            data = resp.json().get("data") or []
            if len(data) != len(texts) or not all(isinstance(d.get("embedding"), list) for d in data):
                resp.failure("not one float vector per input")
