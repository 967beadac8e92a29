"""`capaserve pack`: turn an adapter trained elsewhere into a `capaboost.v1` bundle.

    capaserve pack peft FOLDER -o bundle.safetensors [--base-model ID] [--task TASK]
    capaserve pack reference CKPT --alpha A --rank R [--config JSON] [--name NAME]
                   --base-model ID --task TASK -o bundle.safetensors

`--prefix-map OLD=NEW` (repeatable) replaces the default module-path mapping (strip an
encoder backbone prefix such as `bert.` or `vit.` for AutoModel tasks; none for causal-lm).
Masks are stored as compactly as they can be exactly (docs/bundle-format.md#mask-encodings):
`seed` when they are the generator's (a PEFT LoRA's all-true masks always are; a checkpoint's
when `--mask-seed` names the seed that generated them), else `packed`; `--mask-encoding`
forces one and fails if `seed` cannot reproduce the masks.
`--check-base DIR_OR_ID` also checks every target against that model's modules, built
from its config on the meta device, and is where a PEFT head that reads the base's own
weights (BERT's pooler) takes them from. Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import sys

from adapters.errors import BundleError
from serving.config_sources import csv_list

TASKS = ("feature-extraction", "sequence-classification", "question-answering", "image-classification", "causal-lm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="Convert a PEFT LoRA or a CapaBoost reference checkpoint into a bundle.")
    kinds = p.add_subparsers(dest="source", required=True)

    peft = kinds.add_parser("peft", help="A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).")
    peft.add_argument("folder", help="PEFT adapter folder.")
    peft.add_argument("--base-model", help="Bundle base_model (default: adapter_config's base_model_name_or_path).")
    peft.add_argument(
        "--task", choices=TASKS, help="Bundle task (default: from adapter_config's task_type, else from the saved head)."
    )
    peft.add_argument(
        "--labels", type=csv_list, help="Label names of a saved classifier, comma-separated (default: config.json's id2label)."
    )
    _common(peft)
    peft.set_defaults(func=_run_peft)

    ref = kinds.add_parser("reference", help="A CapaBoost reference-code checkpoint (adapter-transformers layout).")
    ref.add_argument("checkpoint", help=".safetensors (preferred), or .bin/.pt read with torch.load(weights_only=True).")
    ref.add_argument("--config", help="JSON with r and alpha (top level or under 'config'); flags override it.")
    ref.add_argument("--alpha", type=float, help="LoRA alpha; scaling is alpha / r.")
    ref.add_argument("--rank", type=int, help="r of the shared factors.")
    ref.add_argument("--name", help="Adapter name in the checkpoint (`loras.<name>`); needed if it holds several.")
    ref.add_argument("--density", type=float, help="Mask density for the metadata (default: measured).")
    ref.add_argument("--base-model", required=True, help="Id of the base model the adapter was trained on.")
    ref.add_argument("--task", required=True, choices=TASKS, help="Bundle task.")
    _common(ref)
    ref.set_defaults(func=_run_reference)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="Where to write the bundle (.safetensors).")
    p.add_argument(
        "--prefix-map",
        action="append",
        metavar="OLD=NEW",
        help="Rewrite a leading module-path part, e.g. 'bert.=' or '=model.'; repeatable, first match wins.",
    )
    p.add_argument("--description", help="Free text stored in the bundle.")
    p.add_argument(
        "--mask-encoding", choices=("dense", "packed", "seed"),
        help="How to store the masks (default: seed when they are the generator's, else packed).",
    )
    p.add_argument(
        "--mask-seed", type=int, metavar="N",
        help="The seed of capaserve's mask generator that made the checkpoint's masks, in [0, 2^64).",
    )
    p.add_argument(
        "--check-base", metavar="DIR_OR_ID",
        help="Also check the targets against this base model's modules (and read a BERT classifier's pooler from it).",
    )


def _run_peft(args: argparse.Namespace) -> int:
    def build():
        from adapters.importers.peft import import_peft  # deferred: torch only when packing

        return import_peft(
            args.folder,
            base_model=args.base_model,
            task=args.task,
            prefix_map=_prefix_map(args),
            description=args.description,
            labels=args.labels,
            base_weights=args.check_base,
        )

    return _pack(args, build)


def _run_reference(args: argparse.Namespace) -> int:
    def build():
        from adapters.importers.reference import ReferenceConfig, import_reference  # deferred: torch

        config = ReferenceConfig.from_sources(
            args.config, alpha=args.alpha, rank=args.rank, name=args.name, density=args.density
        )
        return import_reference(
            args.checkpoint,
            config,
            base_model=args.base_model,
            task=args.task,
            prefix_map=_prefix_map(args),
            description=args.description,
        )

    return _pack(args, build)


def _prefix_map(args: argparse.Namespace):
    if not args.prefix_map:
        return None
    from adapters.importers.common import PrefixMap  # deferred: torch

    # CAPASERVE_PREFIX_MAP arrives as one string: comma-separated rules
    specs = args.prefix_map.split(",") if isinstance(args.prefix_map, str) else args.prefix_map
    return PrefixMap.parse(specs)


def _encode(bundle, encoding: str | None, mask_seed: int | None):
    """The bundle in the asked encoding, or the most compact exact one; BundleError if impossible."""
    if mask_seed is not None and not 0 <= mask_seed < 2**64:
        raise BundleError(f"--mask-seed must be in [0, 2^64), got {mask_seed}")
    if encoding is None:
        return bundle.compact(mask_seed)
    if encoding == "seed":
        if mask_seed is None and bundle.metadata.density != 1.0:
            raise BundleError(
                "--mask-encoding seed needs --mask-seed: the seed whose generator made these masks "
                "(masks drawn any other way can only be stored as packed or dense)"
            )
        return bundle.with_encoding("seed", 0 if mask_seed is None else mask_seed)
    if mask_seed is not None:
        raise BundleError(f"--mask-seed only applies to --mask-encoding seed, not {encoding}")
    return bundle.with_encoding(encoding)


def _pack(args: argparse.Namespace, build) -> int:
    from adapters.bundle import save_bundle  # deferred: torch
    from adapters.tasks.model_loader import meta_spec
    from adapters.validation import check_servable

    try:
        bundle = _encode(build(), args.mask_encoding, args.mask_seed)
        if args.check_base:
            check_servable(bundle, meta_spec(args.check_base, bundle.metadata.base_model, bundle.metadata.task))
    except BundleError as exc:
        print("error: cannot pack:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    path = save_bundle(bundle, args.output)
    m = bundle.metadata
    print(
        f"wrote {path} ({path.stat().st_size} bytes): {len(m.targets)} targets, rank {m.rank}, "
        f"{m.num_copies} cop{'y' if m.num_copies == 1 else 'ies'}, alpha {m.alpha:g}, "
        f"task {m.task.value}, base {m.base_model}, masks {m.encoding}"
        + (f" (mask_seed {m.mask_seed})" if m.mask_seed is not None else "")
    )
    return 0
