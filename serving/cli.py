"""`capaserve` command line. Each subcommand lives in `serving/commands/<name>.py` and
exposes `register(subparsers)`. A decision: torch and Ray take 3-4 s to import, so a
subcommand imports them inside its `run`, each such import marked `# deferred` with its
reason; this is the only place in capaserve where imports sit inside functions besides
optional dependencies, and it keeps `capaserve --help` and a bad flag free of torch and Ray.

Every flag of every subcommand can also be given as an environment variable
`CAPASERVE_<FLAG>` (dashes become underscores, e.g. `CAPASERVE_ADMIN_TOKEN`; an on/off
flag also as `CAPASERVE_NO_<FLAG>`); a flag on the command line wins over the environment.
`capaserve serve` generates its flags, variables and `--config` file from one model
(serving/config.py, serving/config_sources.py); `train` and `loadtest` generate their flags
from their models (`TrainConfig`, `LoadTestConfig`) with the same generator. A subcommand
whose model imports torch adds its flags when it is parsed (`lazy_flags`), so the rest of
the command line never waits for torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS = ("serve", "rayservice", "pack", "inspect", "train", "loadtest", "keys", "audit")


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser whose options default to CAPASERVE_<FLAG> when that is set."""

    def __init__(
        self, *args: Any, own_env: bool = False, lazy_flags: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        #: True for a subcommand that reads its CAPASERVE_* variables itself (serve: from its config model)
        self.own_env = own_env
        #: adds this subcommand's flags the first time it parses or shows help
        self._lazy_flags = lazy_flags
        super().__init__(*args, **kwargs)

    def _add_lazy_flags(self) -> None:
        if self._lazy_flags is not None:
            add, self._lazy_flags = self._lazy_flags, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._add_lazy_flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_lazy_flags()
        return super().format_help()

    def _add_action(self, action: argparse.Action) -> argparse.Action:  # type: ignore[override]
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in ("help",) and not self.own_env:
            env = "CAPASERVE_" + long[0][2:].upper().replace("-", "_")
            negated = "CAPASERVE_NO_" + long[0][2:].upper().replace("-", "_")
            if isinstance(action, argparse.BooleanOptionalAction) and env not in os.environ and negated in os.environ:
                action.default = os.environ[negated].strip().lower() not in ("1", "true", "yes", "on")
                action.required = False
            elif env in os.environ:
                raw = os.environ[env]
                if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
                    action.default = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    # a string default: argparse converts it with `type` only when this subcommand
                    # is parsed, so a bad variable is a usage error of that subcommand alone
                    action.default = raw
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
