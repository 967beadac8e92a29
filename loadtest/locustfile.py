"""Locust users for capaserve: embeddings, classify, question answering and completions over N
adapters, Zipf-popular (classify and embeddings send images to an image base).

    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 30s --host http://127.0.0.1:8000 \
        --adapters 50 --zipf-s 1.0 --mix embeddings=1,classify=1 --check-fraction 0.1

Every answer is checked for status and shape; a sample (`--check-fraction`) is also
compared with the answer the same adapter gave to a single request on a quiet server
(embeddings, probabilities and answer scores within 1e-4; labels, answer spans and greedy
completions exactly). A
wrong but well-formed answer is a failure too, and is counted apart as "contaminated":
the sign of one adapter's weights leaking into another's batch. The references come
from `--reference-file` if it exists, else from single requests sent at test start
(and are then written there). Options also read LOCUST_<OPTION> environment variables.
`--summary-file` receives the counts as JSON when Locust quits.
"""

from __future__ import annotations

import time
from pathlib import Path

from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from loadtest.scenario import (
    EMBED_ATOL,
    PATHS,
    CheckError,
    Contaminated,
    Picker,
    ReferenceSet,
    RunSummary,
    adapter_names,
    check_answer,
    compute_references,
    parse_mix,
    request_body,
)


class _State:
    """Set up once at test start, read by every user."""

    picker: Picker | None = None
    refs: ReferenceSet | None = None
    check_fraction: float = 0.1
    atol: float = EMBED_ATOL
    summary = RunSummary()
    summary_file: Path | None = None


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("capaserve")
    g.add_argument("--adapters", type=int, default=10, env_var="LOCUST_ADAPTERS", help="N adapters to spread load over.")
    g.add_argument("--adapter-prefix", default="lt-", env_var="LOCUST_ADAPTER_PREFIX",
                   help="Adapters are <prefix>000 .. <prefix>{N-1}; lower numbers are more popular.")
    g.add_argument("--zipf-s", type=float, default=1.0, env_var="LOCUST_ZIPF_S",
                   help="Zipf exponent of adapter popularity (0: uniform).")
    g.add_argument("--mix", default="auto", env_var="LOCUST_MIX",
                   help="Endpoint weights, e.g. embeddings=1,classify=1,question-answering=1,completions=0; "
                   "auto: all the adapters support.")
    g.add_argument("--texts-per-request", type=int, default=1, env_var="LOCUST_TEXTS_PER_REQUEST",
                   help="Inputs per embeddings, classify or question-answering request.")
    g.add_argument("--check-fraction", type=float, default=0.1, env_var="LOCUST_CHECK_FRACTION",
                   help="Share of answers compared with the single-request reference.")
    g.add_argument("--atol", type=float, default=EMBED_ATOL, env_var="LOCUST_ATOL",
                   help="Largest element-wise difference from the reference that is not contamination.")
    g.add_argument("--reference-file", default="", env_var="LOCUST_REFERENCE_FILE",
                   help="JSON of reference answers: read if it exists, else computed at start and written.")
    g.add_argument("--summary-file", default="", env_var="LOCUST_SUMMARY_FILE",
                   help="Write check and contamination counts here (JSON) on quit.")
    g.add_argument("--seed", type=int, default=-1, env_var="LOCUST_SEED", help="Seed of the request draws (-1: random).")


@events.test_start.add_listener
def _setup(environment: Environment, **_: object) -> None:
    opts = environment.parsed_options
    names = adapter_names(opts.adapters, opts.adapter_prefix)
    path = Path(opts.reference_file) if opts.reference_file else None
    refs = ReferenceSet.load(path) if path is not None and path.exists() else None
    if refs is None or any(n not in refs.adapters for n in names):
        refs = compute_references(environment.host, names)
        if path is not None:
            refs.save(path)
    _State.refs = refs
    _State.picker = Picker(refs, names, opts.zipf_s, parse_mix(opts.mix), opts.texts_per_request,
                           seed=None if opts.seed < 0 else opts.seed)
    _State.check_fraction = opts.check_fraction
    _State.atol = opts.atol
    _State.summary_file = Path(opts.summary_file) if opts.summary_file else None


@events.quitting.add_listener
def _write_summary(environment: Environment, **_: object) -> None:
    if _State.summary_file is not None:
        _State.summary.save(_State.summary_file)


class CapaserveUser(FastHttpUser):
    """A closed-loop client: one request at a time, no think time, so the server sets the pace."""

    wait_time = constant(0)
    network_timeout = 120.0
    connection_timeout = 30.0

    @task
    def infer(self) -> None:
        picker, refs, summary = _State.picker, _State.refs, _State.summary
        if picker is None or refs is None:
            time.sleep(0.1)
            return
        kind, adapter, idx = picker.draw()
        compare = picker.rng.random() < _State.check_fraction
        body = request_body(kind, adapter, refs.inputs(kind, idx))
        with self.client.post(PATHS[kind], json=body, name=PATHS[kind], catch_response=True) as resp:
            summary.requests += 1
            summary.by_kind[kind] = summary.by_kind.get(kind, 0) + 1
            summary.by_adapter[adapter] = summary.by_adapter.get(adapter, 0) + 1
            try:
                if resp.status_code != 200:
                    raise CheckError(f"{kind} {adapter}: HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                try:
                    payload = resp.json()
                except Exception as exc:  # noqa: BLE001 - any undecodable body is a failure
                    raise CheckError(f"{kind} {adapter}: body is not JSON ({exc})") from None
                summary.checked += int(compare)
                check_answer(kind, payload, refs.adapters[adapter], idx, compare, _State.atol)
            except Contaminated as exc:
                summary.failures += 1
                summary.contaminated += 1
                summary.note(f"contaminated: {exc}")
                resp.failure(f"contaminated: {exc}")
            except CheckError as exc:
                summary.failures += 1
                summary.note(str(exc))
                resp.failure(str(exc))
            else:
                resp.success()
