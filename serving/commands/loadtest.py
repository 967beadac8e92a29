"""`capaserve loadtest`: Locust against the grouped scheduler, the swap-per-request baseline and
a single adapter, in one run; writes CSVs, a Markdown summary and plots (see loadtest/run.py).

The load test is the installed `loadtest` package; Locust, matplotlib and httpx come with the
`loadtest` extra. `--help` lists the flags without the extra; a run without it says what to install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from types import ModuleType

from serving.config_sources import ConfigError, add_model_flags, model_from_namespace


def _import_run() -> ModuleType:
    # deferred: loadtest.run needs the optional `loadtest` extra (Locust, matplotlib);
    # without it every other subcommand and `capaserve --help` must still work.
    from loadtest import run

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="Load-test grouped vs swap-per-request vs single adapter (Locust); write a report.",
        description="Start capaserve on 127.0.0.1 (or target --url), register N synthetic adapters, run Locust per "
        "configuration and write Locust CSVs, summary.md and PNG plots to --out.",
    )
    try:
        mod = _import_run()
    except ImportError:
        # loadtest.run imports the extra's modules only where it uses them, so this is a broken
        # install: keep `capaserve --help` and the other subcommands working; running this one
        # says what is wrong.
        p.set_defaults(func=run, accepts_unknown_args=True)
    else:
        add_model_flags(p, mod.LoadTestConfig)
        p.set_defaults(func=run)


#: What a run imports from the `loadtest` extra (its flags need none of them).
EXTRA_MODULES = ("httpx", "locust", "matplotlib")


def run(ns: argparse.Namespace) -> int:
    try:
        mod = _import_run()
        for name in EXTRA_MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        if exc.name == "loadtest":  # an editable install made before loadtest/ became a package
            raise SystemExit("capaserve's loadtest package is not installed: reinstall capaserve") from exc
        raise SystemExit(
            f"capaserve loadtest needs the loadtest extra ({exc.name} is missing): "
            "pip install 'capaserve[loadtest]'"
        ) from exc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = model_from_namespace(mod.LoadTestConfig, ns)
    except ConfigError as exc:
        raise SystemExit(f"capaserve loadtest: error: {exc}") from None
    summary = mod.run(cfg)
    print(summary.read_text())
    print(f"report: {summary.parent}")
    return 0
