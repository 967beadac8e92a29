"""`capaserve loadtest`: Locust against the grouped scheduler, the swap-per-request baseline and
a single adapter, in one run; writes CSVs, a Markdown summary and plots (see loadtest/run.py).

The load test lives in the source tree's `loadtest/` folder, next to `serving/`, so this
command works from a checkout (or an editable install), not from a wheel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_run():  # noqa: ANN202 - the module
    if not (ROOT / "loadtest" / "run.py").exists():
        raise SystemExit("capaserve loadtest needs the capaserve source tree (loadtest/ next to serving/)")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
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
    except (SystemExit, ImportError):
        # Not a checkout, or the [loadtest] extra is missing: keep `capaserve --help` and the
        # other subcommands working; running this one says what to install.
        p.set_defaults(func=run, accepts_unknown_args=True)
    else:
        mod.add_arguments(p)
        p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    try:
        mod = _import_run()
    except ImportError as exc:
        raise SystemExit(
            f"capaserve loadtest needs the loadtest extra ({exc.name} is missing): "
            "pip install 'capaserve[loadtest]'"
        ) from exc
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = mod.run(mod.config_from(ns))
    print(summary.read_text())
    print(f"report: {summary.parent}")
    return 0
