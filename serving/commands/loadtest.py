"""`capaserve loadtest` (not built yet)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="(not built yet)")
    p.set_defaults(func=lambda args: print("capaserve loadtest is not built yet") or 2)
