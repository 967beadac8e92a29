"""Schemathesis over the running app's own OpenAPI schema: no request gets a 5xx.

One real Ray Serve app on 127.0.0.1 (MiniLM base, a temp registry, an admin token, one
feature-extraction, one sequence-classification and one question-answering adapter uploaded). The schema is
fetched over HTTP from /openapi.json and every operation in it is fuzzed (schemathesis
positive and negative generation) with a bounded, derandomized
number of examples, so a CI run is reproducible. Each response must

* not be a 5xx (schemathesis' `not_a_server_error`), and
* if it is a 4xx, carry the error body of docs/http-api.md#errors `{"error": {"message", "type", "code"}}`.

Generation is steered so the interesting paths are reached: a `flatmap_case` hook sends
the admin token on about half of the cases (registry writes pass auth and reach the
handlers) and puts a served model name (the base, an adapter, `name@1`) into `model` /
`lora_name` in most JSON bodies,
so fuzzed inputs reach the model replicas.

Destructive operations (DELETE /v1/adapters/{name}, POST /v1/unload_lora_adapter) are
fuzzed too, with the admin token; should one of them delete a fixture adapter (only if
the fuzzer hits its exact name), `restore_adapters` re-uploads it after that case, so
the cases that follow still find the adapters they name.
"""

from __future__ import annotations


import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from adapters.bundle import Task, save_bundle
from adapters.synthetic import random_bundle
from adapters.validation import BaseModelSpec
from tests.conftest import MINILM_ID
from tests.serve_helpers import APP_NAME, running_app

pytestmark = pytest.mark.ray

ADMIN = "fuzz-admin-token"
ADAPTERS = {
    "fz-fe": Task.FEATURE_EXTRACTION, "fz-cls": Task.SEQUENCE_CLASSIFICATION, "fz-qa": Task.QUESTION_ANSWERING,
}
MODELS = [MINILM_ID, *ADAPTERS, *(f"{name}@1" for name in ADAPTERS)]
#: Examples per operation in the fuzzing phase (positive and negative modes share them).
MAX_EXAMPLES = 20
#: Schemathesis' seed: the same cases on every run.
SEED = 20240611


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    args = {
        "registry": str(tmp_path_factory.mktemp("fuzz-registry")),
        "admin_token": ADMIN,
        "replicas": 1,
        "num_cpus": 1,
        "max_batch_size": 8,
        "batch_wait_ms": 2,
        "max_seq_len": 128,
        "registry_poll_s": 0.5,
        "max_upload_bytes": 4 * 1024 * 1024,
    }
    with running_app(args, num_cpus=2) as base:
        yield base


@pytest.fixture(scope="module")
def adapter_bytes(base_url, tmp_path_factory) -> dict[str, bytes]:
    """One adapter per task, built on the served base's spec and uploaded over HTTP."""
    from ray import serve

    handle = serve.get_deployment_handle("CapaserveModel", app_name=APP_NAME)
    spec = BaseModelSpec.from_dict(handle.info.remote().result(timeout_s=60).spec)
    targets = [n for n in spec.linear_shapes if n.endswith("attention.self.query")][:2]
    folder = tmp_path_factory.mktemp("fuzz-bundles")
    out = {}
    for i, (name, task) in enumerate(ADAPTERS.items()):
        labels = ["neg", "pos"] if task is Task.SEQUENCE_CLASSIFICATION else None
        bundle = random_bundle(spec, targets, rank=4, seed=i, task=task, labels=labels)
        out[name] = save_bundle(bundle, folder / f"{name}.safetensors").read_bytes()
    restore_adapters(base_url, out)
    return out


def restore_adapters(base: str, data: dict[str, bytes]) -> None:
    """Upload every fixture adapter the registry does not hold (again)."""
    for name, blob in data.items():
        if httpx.get(f"{base}/v1/adapters/{name}", timeout=30).status_code == 404:
            r = httpx.put(f"{base}/v1/adapters/{name}", content=blob, timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 201, r.text


def _steer(case, admin: bool, model: str | None):
    """The case with the admin token and/or a served model name put in."""
    if admin:
        case.headers = {**(case.headers or {}), "authorization": f"Bearer {ADMIN}"}
    if model is not None and isinstance(case.body, dict):
        for key in ("model", "lora_name"):
            if key in case.body:
                case.body[key] = model
    return case


@pytest.fixture(scope="module")
def api_schema(base_url, adapter_bytes):
    config = schemathesis.Config.from_dict({"seed": SEED, "phases": {"stateful": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)


def check_error_body(response: httpx.Response | object) -> None:
    status = response.status_code
    if not 400 <= status < 500:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code"}, body
    assert err["code"] == status and isinstance(err["message"], str) and isinstance(err["type"], str), body


def steered(operation, mode: GenerationMode):
    """Cases of one operation in one generation mode, with the admin token and a served model
    name put in (so fuzzed inputs pass auth and reach the handlers and the model replicas)."""
    choice = st.tuples(st.booleans(), st.sampled_from([None, *MODELS]))
    return operation.as_strategy(generation_mode=mode).flatmap(
        lambda case: choice.map(lambda c: _steer(case, *c))
    )


def test_no_server_errors(api_schema, base_url, adapter_bytes):
    """Every operation of /openapi.json, positive and negative cases: no 5xx, 4xx bodies per the docs.

    Hypothesis drives schemathesis' case strategies directly (schemathesis' pytest plugin is
    not used: its collection hooks break with each pytest minor), derandomized, so a run is
    reproducible; every failing operation is reported, not only the first.
    """
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=steered(operation, mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            def fuzz(case) -> None:
                response = case.call(timeout=60)
                case.validate_response(response, checks=[not_a_server_error])
                check_error_body(response)
                if case.method.upper() == "DELETE" or case.path == "/v1/unload_lora_adapter":
                    restore_adapters(base_url, adapter_bytes)

            try:
                fuzz()
            except Unsatisfiable:
                # Nothing to negate (no parameters, or only ones every value of is valid).
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{operation.label} [positive]: no case could be generated")
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)
