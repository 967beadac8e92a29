"""`capaserve keys create|list|revoke`: API keys in the registry store, with no server running.

The same records `POST/GET/DELETE /v1/keys` manage (adapters/registry/keys.py): a key made
here is accepted by every server on that registry within a second, and `revoke` is refused
there within a second. `create` prints the key once, as JSON; nothing shows it again.
Every change is written to the audit trail as made by `cli` (`capaserve audit`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

#: adapters.manifest's TENANT_PATTERN, repeated so that `capaserve --help` imports no torch
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def add_registry_flags(p: argparse.ArgumentParser) -> None:
    """`--registry` and `--registry-endpoint-url`, with the server's defaults."""
    from serving.config import default_registry_dir

    p.add_argument("--registry", default=default_registry_dir(), help="Registry folder or s3://bucket/prefix.")
    p.add_argument("--registry-endpoint-url", default=None, help="S3-compatible endpoint for an s3:// registry.")


def open_registry(args: argparse.Namespace):  # noqa: ANN201 - RegistryStore
    # deferred: boto3 is imported only when a store is opened
    from adapters.registry.backends import open_store

    return open_store(args.registry, endpoint_url=args.registry_endpoint_url)


def _tenant(value: str) -> str | None:
    if value == "-":
        return None
    if not (value.isascii() and TENANT_RE.fullmatch(value)):
        raise argparse.ArgumentTypeError(f"tenant must match {TENANT_RE.pattern} (or '-' for no tenant)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="Create, list and revoke API keys in the registry store.")
    actions = p.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="Make a key; prints it once, as JSON.")
    create.add_argument("--tenant", type=_tenant, required=True, help="Tenant of the key ('-': no tenant).")
    create.add_argument("--role", choices=["reader", "writer", "admin"], required=True, help="What the key may do.")
    create.add_argument("--name", default=None, help="A label for people.")
    listing = actions.add_parser("list", help="Every key (never its secret), one JSON object per line.")
    revoke = actions.add_parser("revoke", help="Revoke a key by its id.")
    revoke.add_argument("id", help="The key's id (from `keys list`).")
    for q in (create, listing, revoke):
        add_registry_flags(q)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adapters.registry import audit
    from adapters.registry.keys import KeyStore, Role

    store = open_registry(args)
    keys = KeyStore(store)
    if args.action == "create":
        created = keys.create(args.tenant, Role(args.role), args.name)
        audit.append(store, audit.AuditEntry(key_id="cli", action="key.create", name=created.id))
        print(created.model_dump_json())
    elif args.action == "list":
        for rec in keys.list():
            print(rec.info().model_dump_json())
    else:
        if keys.revoke(args.id) is None:
            print(f"capaserve keys revoke: no key {args.id!r}", file=sys.stderr)
            return 1
        audit.append(store, audit.AuditEntry(key_id="cli", action="key.revoke", name=args.id))
        print(json.dumps({"revoked": args.id}))
    return 0
