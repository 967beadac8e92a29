"""GET /v1/models: the base model, then every adapter (latest version) with `parent` = base id;
each card names its task and modality (text or image: what its inputs are)."""

from __future__ import annotations

import asyncio

from adapters.registry.store import RegistryStore
from serving.api.auth import Principal
from serving.protocol import ModelCard, ModelList, unix_now
from serving.service import ServingContext


async def list_models(ctx: ServingContext, store: RegistryStore, viewer: Principal | None = None) -> ModelList:
    """The base and the adapters `viewer` may see (all of them without a viewer)."""
    info = await ctx.info()
    modality = await ctx.modality()
    cards = [
        ModelCard(
            id=info.model_id, created=ctx.base_created or unix_now(), root=info.model_id, parent=None, task=info.task, modality=modality,
            precision=info.precision,
        )
    ]
    for m in await asyncio.to_thread(store.list_latest):
        if viewer is not None and not viewer.can_see(m.name):
            continue
        cards.append(
            ModelCard(
                id=m.name,
                created=int(m.created_at.timestamp()),
                root=m.ref,
                parent=info.model_id,
                task=m.task.value,
                modality=modality,
            )
        )
    return ModelList(data=cards)
