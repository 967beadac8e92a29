"""The one configuration model (serving/config.py) and its sources (serving/config_sources.py).

Fast, no Ray: every setting must be reachable by flag, variable and file with the names
the docs give, the sources must layer flag > environment > file > default, and a bad
value must stop `capaserve serve` with status 2 naming the setting as the user wrote it.
"""

from __future__ import annotations

import ast
import os
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from serving.cli import build_parser, main
from serving.config import GiB, MiB, ServeConfig, available_cpus, default_registry_dir, parse_bytes
from serving.config_sources import (
    SETTINGS,
    ConfigError,
    Setting,
    config_from,
    config_from_namespace,
    config_of,
    render_docs,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "cli.md"


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    ns = build_parser().parse_args(["serve", *argv])
    return config_from_namespace(ns, environ=env or {})


def value_at(config: ServeConfig, s: Setting) -> typing.Any:
    node: typing.Any = config
    for part in s.path:
        node = getattr(node, part)
    if isinstance(node, SecretStr):
        return node.get_secret_value()
    if isinstance(node, list):
        return [v.get_secret_value() if isinstance(v, SecretStr) else v for v in node]
    return node


def sample(s: Setting) -> tuple[str, typing.Any]:
    """A valid non-default value of `s` as text (for flag, variable and file) and as parsed."""
    default = s.info.get_default(call_default_factory=True)
    plain = typing.get_args(s.info.annotation)[0] if typing.get_origin(s.info.annotation) else s.info.annotation
    if s.is_bool:
        return ("false" if default else "true"), (not default)
    if s.is_bytes:
        return "3MiB", 3 * MiB
    if typing.get_origin(s.info.annotation) is typing.Literal:
        other = [c for c in typing.get_args(s.info.annotation) if c != default][0]
        return other, other
    if s.is_secret:
        if typing.get_origin(plain) is list or typing.get_origin(s.info.annotation) is list:
            return "k1, k2", ["k1", "k2"]
        return "tok-123", "tok-123"
    if s.info.annotation in (float, float | None):
        x = default * 1.1 if default else 0.5
        return f"{x:g}", float(f"{x:g}")
    if s.info.annotation in (int, int | None):
        n = 1 if default is None else default + 2  # 1: valid for min_replicas beside the default replicas
        return str(n), n
    if s.info.annotation == list[str]:
        return "/tmp/a, /srv/b", ["/tmp/a", "/srv/b"]
    return "/tmp/some-value", "/tmp/some-value"


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.key)
def test_every_setting_by_flag_variable_and_file(s: Setting, tmp_path: Path) -> None:
    text, want = sample(s)
    default = value_at(ServeConfig(), s)
    assert want != default, "the sample must differ from the default, or the test proves nothing"
    flag_argv = [s.flag if want else f"--no-{s.flag[2:]}"] if s.is_bool else [s.flag, text]
    assert value_at(parse(flag_argv), s) == want
    assert value_at(parse([], {s.env: text}), s) == want
    tree: dict[str, typing.Any] = {}
    node = tree
    for part in s.path[:-1]:
        node = node.setdefault(part, {})
    node[s.path[-1]] = text
    f = tmp_path / "serve.yaml"
    f.write_text(yaml.safe_dump(tree))
    assert value_at(parse(["--config", str(f)]), s) == want
    assert value_at(config_of(**{s.flag[2:].replace("-", "_"): text}), s) == want


def test_precedence_flag_over_variable_over_file_over_default(tmp_path: Path) -> None:
    f = tmp_path / "serve.yaml"
    f.write_text("scheduler: {max_batch_size: 3, batch_wait_ms: 7}\nserver: {port: 9003, replicas: 2}\n")
    env = {"CAPASERVE_MAX_BATCH_SIZE": "4", "CAPASERVE_PORT": "9004", "CAPASERVE_CONFIG": str(f)}
    c = parse(["--port", "9005"], env)
    assert c.server.port == 9005  # flag
    assert c.scheduler.max_batch_size == 4  # variable over file
    assert c.scheduler.batch_wait_ms == 7 and c.server.replicas == 2  # file (named by CAPASERVE_CONFIG)
    assert c.scheduler.max_queue == 256  # default
    assert parse([], {"CAPASERVE_PORT": ""}).server.port == 8000  # an empty variable is unset


def test_defaults_are_declared_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    c = parse([])
    assert c == ServeConfig()
    assert c.registry.location == str(tmp_path / "capaserve" / "registry") == default_registry_dir()
    assert c.scheduler.adapter_mode == "adaptive" and c.engine.model is None and c.server.admin_token is None
    assert c.engine.adapter_cache_bytes == 2 * GiB and c.registry.max_upload_bytes == 256 * MiB


def test_help_lists_every_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for s in SETTINGS:
        assert s.flag in out and s.env in out, s.key
    assert "--config FILE" in out


def test_docs_table_is_generated_from_the_model() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert render_docs(text) == text, "docs/cli.md is stale: run python -m serving.config_sources docs/cli.md"
    for s in SETTINGS:
        assert f"`{s.env}`" in text and f"`{s.key}`" in text


@pytest.mark.parametrize(
    ("argv", "env", "file", "says"),
    [
        (["--port", "70000"], {}, None, "invalid --port '70000'"),
        ([], {"CAPASERVE_REPLICAS": "two"}, None, "invalid CAPASERVE_REPLICAS 'two'"),
        ([], {}, "engine: {modle: x}\n", "unknown setting engine.modle in"),
        ([], {}, "engine: {modle: x}\n", "did you mean engine.model?"),
        ([], {}, "server: [1, 2\n", "not valid YAML"),
        ([], {}, "- a\n- b\n", "expected a mapping of sections"),
        (["--adapter-cache-bytes", "lots"], {}, None, "not a byte size: 'lots'"),
        (["--dtype", "int8"], {}, None, "invalid --dtype 'int8'"),
        ([], {"CAPASERVE_GROUPING": "maybe"}, None, "invalid CAPASERVE_GROUPING 'maybe'"),
        ([], {}, "scheduler: {max_queue: 0}\n", "invalid scheduler.max_queue in"),
        (["--mode-policy-leave-top-share", "0.1"], {}, None, "leave_top_share"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(
    argv: list[str], env: dict[str, str], file: str | None, says: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if file is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(file)
        argv = [*argv, "--config", str(path)]
    assert main(["serve", *argv]) == 2  # before any Ray or model work
    err = capsys.readouterr().err
    assert err.startswith("capaserve serve: error: ") and says in err, err
    assert len(err.strip().splitlines()) == 1


def test_secrets_stay_out_of_errors_and_reprs() -> None:
    env = {"CAPASERVE_ADMIN_TOKEN": "s3cret-admin", "CAPASERVE_API_KEYS": "s3cret-k1,s3cret-k2"}
    c = parse([], env)
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.model_dump())
    with pytest.raises(ConfigError) as err:
        config_from({}, {**env, "CAPASERVE_PORT": "-1"})
    assert "s3cret" not in str(err.value) and "CAPASERVE_PORT" in str(err.value)


def test_config_of_uses_flag_names_and_rejects_others() -> None:
    c = config_of(registry="/tmp/r", max_batch_size=16, replicas=2, grouping=False, api_keys="a,b")
    assert c == ServeConfig.model_validate(
        {"registry": {"location": "/tmp/r"}, "scheduler": {"max_batch_size": 16, "grouping": False},
         "server": {"replicas": 2, "api_keys": ["a", "b"]}}
    )
    with pytest.raises(ConfigError, match="unknown setting.*max_batch"):
        config_of(max_batch=16)


def test_serve_run_args_in_the_app_docstring_are_a_valid_config() -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "serving" / "app.py").read_text(encoding="utf-8"))) or ""
    yaml_block = doc[doc.index("applications:"):]
    apps = yaml.safe_load(yaml_block)["applications"]
    assert apps[0]["import_path"] == "serving.app:build_app"
    c = ServeConfig.model_validate(apps[0]["args"])
    assert c == config_of(model="/models/minilm", registry="s3://bucket/adapters", replicas=2)


def test_derived_values() -> None:
    # (engine workers, torch threads per worker): on CPU one-thread workers follow the CPU share
    assert config_of(num_cpus=0.5).engine_plan("cpu") == (1, 1)
    assert config_of(num_cpus=3).engine_plan("cpu") == (3, 1)
    assert config_of(num_cpus=4, num_threads=2).engine_plan("cpu") == (2, 2)
    assert config_of(num_cpus=4, engine_workers=1, num_threads=4).engine_plan("cpu") == (1, 4)
    assert config_of(num_cpus=3).engine_plan("cuda") == (1, 3)
    assert config_of(num_cpus=3, num_threads=1).engine_plan("cuda") == (1, 1)
    # without num_cpus, the host's available cores are shared by the replicas (at least 1 each)
    cores = available_cpus()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert ServeConfig().replica_cpus() == cores
    assert config_of(replicas=2).replica_cpus() == max(1, cores // 2)
    assert config_of(replicas=4 * cores).replica_cpus() == 1
    assert config_of(num_cpus=0.5).replica_cpus() == 0.5
    assert config_of(replicas=2).resolved().server.num_cpus == max(1, cores // 2)
    assert config_of(device="cuda:1").device_type() == "cuda" and ServeConfig().device_type() == "cpu"
    s = ServeConfig().scheduler
    assert s.call_overhead("cpu") == 256 and s.call_overhead("cuda") == 2048
    assert config_of(call_overhead_tokens=0).scheduler.call_overhead("cuda") == 0
    assert ServeConfig().engine.served_name() == "sentence-transformers/all-MiniLM-L6-v2"
    assert config_of(model="/m/x").engine.served_name() == "/m/x"
    assert config_of(model="/m/x", served_model_name="x").engine.served_name() == "x"


@pytest.mark.parametrize(
    ("text", "n"), [("256MiB", 256 * MiB), ("2GiB", 2 * GiB), ("1.5GB", 1_500_000_000), ("4096", 4096), (" 1 kib ", 1024)]
)
def test_byte_sizes(text: str, n: int) -> None:
    assert parse_bytes(text) == n


def test_gpus_per_replica_default_follows_the_cluster() -> None:
    """On a CUDA host each model replica reserves a GPU unless told otherwise (issue 15)."""
    assert config_of().server.gpus_per_replica(0) == 0.0
    assert config_of().server.gpus_per_replica(1) == 1.0
    assert config_of(replicas=2).server.gpus_per_replica(8) == 1.0
    assert config_of(replicas=3).server.gpus_per_replica(2) == 0.5  # 4 halves for 3 replicas, each on one GPU
    assert config_of(replicas=2, max_replicas=4).server.gpus_per_replica(1) == 0.25  # sized for the most replicas
    assert config_of(num_gpus=0).server.gpus_per_replica(8) == 0.0  # given: as given
    assert config_of(num_gpus=0.5).server.gpus_per_replica(0) == 0.5


def test_autoscaling_bounds() -> None:
    s = config_of().server
    assert not s.autoscaling and (s.lowest_replicas(), s.most_replicas()) == (1, 1)
    s = config_of(replicas=2, max_replicas=5).server
    assert s.autoscaling and (s.lowest_replicas(), s.replicas, s.most_replicas()) == (1, 2, 5)
    s = config_of(min_replicas=0, replicas=1).server
    assert s.autoscaling and (s.lowest_replicas(), s.most_replicas()) == (0, 1)
    with pytest.raises(ConfigError, match="between min_replicas"):
        config_of(replicas=4, max_replicas=3)
