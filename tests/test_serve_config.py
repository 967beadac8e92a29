"""ServeArgs, the CLI flags and env defaults, and build_app as `serve run` calls it (no cluster)."""

from __future__ import annotations

import pytest

from serving.app import ServeArgs, build_app, default_registry_dir
from serving.cli import build_parser
from serving.commands.serve import serve_args_from


def parse(argv: list[str]) -> ServeArgs:
    return serve_args_from(build_parser().parse_args(["serve", *argv]))


def test_flags_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = parse(["--port", "9001", "--api-keys", "k1, k2", "--replicas", "2", "--no-grouping",
                  "--max-upload-bytes", "4096"])
    assert args.port == 9001 and args.replicas == 2 and args.grouping is False
    assert args.max_upload_bytes == 4096
    assert [k.get_secret_value() for k in args.api_keys] == ["k1", "k2"]
    assert args.registry == str(tmp_path / "capaserve" / "registry") == default_registry_dir()
    assert args.host == "127.0.0.1" and args.model is None and args.admin_token is None


def test_env_defaults_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("CAPASERVE_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("CAPASERVE_PORT", "8123")
    monkeypatch.setenv("CAPASERVE_MAX_BATCH_SIZE", "4")
    args = parse(["--port", "8124"])
    assert args.admin_token is not None and args.admin_token.get_secret_value() == "s3cret"
    assert args.port == 8124 and args.max_batch_size == 4
    assert "s3cret" not in repr(args)


def test_torch_threads_follow_cpu_share():
    assert ServeArgs(num_cpus=0.5).torch_threads() == 1
    assert ServeArgs(num_cpus=3).torch_threads() == 3


@pytest.mark.parametrize("bad", [{"replicas": 0}, {"dtype": "int8"}, {"unknown_field": 1}, {"port": 70000}])
def test_bad_args_are_rejected(bad):
    with pytest.raises(ValueError):
        ServeArgs(**bad)


def test_build_app_from_a_config_dict_as_serve_run_does(tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    app = call_user_app_builder_with_args_if_necessary(build_app, {"registry": str(tmp_path), "replicas": 2})
    assert isinstance(app, Application)
    assert isinstance(build_app(ServeArgs(registry=str(tmp_path))), Application)
