"""`capaserve inspect` (not built yet)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="(not built yet)")
    p.set_defaults(func=lambda args: print("capaserve inspect is not built yet") or 2)
