"""`capaserve` command line. Each subcommand lives in `serving/commands/<name>.py` and
exposes `register(subparsers)`; modules import heavy libraries only when run, so
`capaserve --help` stays fast.

Every flag of every subcommand can also be given as an environment variable
`CAPASERVE_<FLAG>` (dashes become underscores, e.g. `CAPASERVE_ADMIN_TOKEN`); a flag on
the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = ("serve", "pack", "inspect", "train", "loadtest")


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to CAPASERVE_<FLAG> when that is set."""

    def _add_action(self, action: argparse.Action) -> argparse.Action:  # type: ignore[override]
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in ("help",):
            env = "CAPASERVE_" + long[0][2:].upper().replace("-", "_")
            if env in os.environ:
                raw = os.environ[env]
                if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                    action.default = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    action.default = action.type(raw) if callable(action.type) else raw
                action.required = False
            if action.help and action.help is not argparse.SUPPRESS:
                action.help += f" [env: {env}]"
        return super()._add_action(action)


def build_parser() -> argparse.ArgumentParser:
    parser = EnvDefaultsParser(prog="capaserve", description="Serve CapaBoost adapters on one base model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvDefaultsParser)
    for name in COMMANDS:
        importlib.import_module(f"serving.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_unknown_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
