"""`capaserve pack` (not built yet)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="(not built yet)")
    p.set_defaults(func=lambda args: print("capaserve pack is not built yet") or 2)
