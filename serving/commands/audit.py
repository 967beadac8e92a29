"""`capaserve audit`: print the registry's audit trail (adapters/registry/audit.py) as JSON lines,
oldest first: every upload, delete, key creation and revocation, who made it and when."""

from __future__ import annotations

import argparse

from serving.commands.keys import add_registry_flags, open_registry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="Print the registry's audit trail as JSON lines.")
    add_registry_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adapters.registry import audit

    for entry in audit.read(open_registry(args)):
        print(entry.model_dump_json())
    return 0
