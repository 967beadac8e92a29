"""A BERT encoder's forward on its real tokens only: no compute on padding outside attention.

Why: requests arrive with texts of mixed lengths, so a padded batch spends every linear layer,
the activation, the residual adds and the layer norms on pad positions too. Under load the
replica's batches were about 30% padding (the scheduler's length splits trade padding for
more calls, each of which reads all the weights again). Here every token-wise operation runs
on the batch's real tokens stacked into one [tokens, hidden] matrix; only attention, the one
step that mixes positions, runs on padded views, gathered and scattered back per layer. That
is TEI's and vLLM's layout for encoders, without their GPU kernels. Query, key and value are
gathered once, computed as one matmul where the weights are packed (`fused_projections`).
The views group texts by length rounded up to a multiple of 16 (`attention_views`): CPU SDPA
pays for every position of a view, pads included, and runs fastest at multiples of 16
positions, so one view as wide as the longest text cost the short texts the most.

On weights prepacked for oneDNN (bfloat16 on a CPU, serving/engine/packed.py) the
intermediate GELU and the two residual adds of each layer also run as post-ops of their
matmuls (`fused_linear`): computed in float32 on the accumulator, rounded to bfloat16 once,
instead of three more passes over the [tokens, 1536] activations, one of which (GELU) took a
fifth of the padded forward.

The token count is rounded up (`bucket`, at most an eighth more rows) because oneDNN builds
a kernel per matmul shape, and in a server batches rarely repeat a token count: without the
buckets the server's forwards were no cheaper than padded ones. The figures behind these
decisions are in loadtest/results/overheads.md.

Exactness: token rows of a matmul are computed independently, so without the fused post-ops
each real token's projections match the padded forward's up to the kernel the matmul's row
count selects; attention on a narrower view adds masked positions or drops them, which moves
float32 results in their last bits (within 1e-5 of transformers' forward in the tests); the
fused post-ops round once instead of twice (tests/test_unpadded.py bounds both against
transformers' forward and against float32).

Applies to `BertModel` (BERT, MiniLM and the sentence-transformers built on them) in eval
mode as an encoder (no decoder or cross-attention), whatever the padding side: a position is
its column in the padded batch, as in transformers. Mixed-adapter forwards too: their
per-row updates are forward hooks (serving/engine/mixed.py), which here see the stacked
tokens, so the caller hands them one row per token, its text's adapter; a hooked layer runs
unfused (`fused_linear`). Everything else runs `model(**batch)`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import BertModel

from serving.engine.packed import fused_linear, fused_projections

#: Attention views are a multiple of this many positions wide: CPU SDPA costs less per text
#: at 32 positions than at 24, and at 64 than at 59 (loadtest/results/overheads.md).
ATTENTION_MULTIPLE = 16


def unpadded_applies(model: torch.nn.Module) -> bool:
    """Whether `forward_unpadded` computes what `model(**batch).last_hidden_state` does."""
    if type(model) is not BertModel or model.training:
        return False
    config = model.config
    return not config.is_decoder and not config.add_cross_attention


def forward_unpadded(model: BertModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states [batch, longest, hidden] of a padded `batch` (input_ids,
    attention_mask, token_type_ids if any); pad positions hold zeros."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    rows, longest = ids.shape
    flat = mask.reshape(-1)
    real = flat.nonzero().squeeze(1)  # padded position of each real token
    tokens = real.numel()
    emb = model.embeddings
    types = batch.get("token_type_ids")
    type_ids = types.reshape(-1)[real] if types is not None else torch.zeros_like(real)
    positions = torch.arange(longest, device=ids.device).repeat(rows)[real]
    x = emb.word_embeddings(ids.reshape(-1)[real]) + emb.token_type_embeddings(type_ids)
    x = emb.LayerNorm(x + emb.position_embeddings(positions))

    # spare rows that no output reads, so the matmuls see few distinct shapes (`bucket`)
    spare = bucket(tokens) - tokens
    if spare:
        x = F.pad(x, (0, 0, 0, spare))
    views = attention_views(mask, real, spare)
    for layer in model.encoder.layer:
        attn = layer.attention.self
        heads, size = attn.num_attention_heads, attn.attention_head_size
        qkv = fused_projections((attn.query, attn.key, attn.value), x)
        if views.gather is not None:
            qkv = qkv.index_select(0, views.gather)
        ctx = qkv.new_empty(qkv.shape[0], heads * size)
        for start, n, width, keys in views.groups:
            q, k, v = qkv[start : start + n * width].view(n, width, 3, heads, size).permute(2, 0, 3, 1, 4)
            part = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attn.scaling)
            ctx[start : start + n * width].view(n, width, heads, size).copy_(part.transpose(1, 2))
        if views.back is not None:
            ctx = ctx.index_select(0, views.back)
        elif spare:
            ctx[tokens:].zero_()
        out = layer.attention.output
        a = out.LayerNorm(fused_linear(out.dense, ctx, add=x))
        inter = layer.intermediate
        h = fused_linear(inter.dense, a, act=inter.intermediate_act_fn)
        out = layer.output
        x = out.LayerNorm(fused_linear(out.dense, h, add=a))
    if views.gather is None:  # no padding: the token rows are the batch
        return x[:tokens].view(rows, longest, -1)
    hidden = x.new_zeros(rows * longest, x.shape[-1])
    hidden[real] = x[:tokens]
    return hidden.view(rows, longest, -1)


def bucket(tokens: int) -> int:
    """`tokens` rounded up to 8 steps per power of two, steps of at least 8: at most an eighth
    more rows (under 8 for small counts), and 64 distinct row counts up to 8,192, whose oneDNN
    kernels stay cached."""
    step = max(8, 1 << max(0, tokens.bit_length() - 4))
    return -(-tokens // step) * step


class AttentionViews(NamedTuple):
    """Where attention reads and writes. `gather` takes token rows into the views' rows (None:
    the token rows are already the one view); each group (first row, texts, width, key mask or
    None) is one SDPA call on a [texts, width] view; `back` takes the views' rows to token order,
    then the spare rows (None: already in order)."""

    gather: torch.Tensor | None
    groups: list[tuple[int, int, int, torch.Tensor | None]]
    back: torch.Tensor | None


def attention_views(mask: torch.Tensor, real: torch.Tensor, spare: int) -> AttentionViews:
    """Texts grouped by their length rounded up to ATTENTION_MULTIPLE, one padded view per group.

    Why groups: SDPA's CPU kernel costs per text and position, pads included, and a view as wide
    as the longest text pads short texts the most; the width of a multiple of 16 is the kernel's
    fast case (at 24 positions it costs more than at 32). A text's real tokens go to the front
    of its view row, in order, whatever the padding side: attention has no notion of place (the
    positions are in the embeddings already), and the key mask hides the rest of the row."""
    rows, longest = mask.shape
    tokens = real.numel()
    if tokens == rows * longest:  # no padding (one text, say): no gather, no mask
        return AttentionViews(None, [(0, rows, longest, None)], None)
    dev = mask.device
    lengths = mask.sum(1)
    widths = (-(-lengths // ATTENTION_MULTIPLE) * ATTENTION_MULTIPLE).clamp_min(ATTENTION_MULTIPLE)
    order = torch.argsort(widths, stable=True)  # texts by width: each group's rows together
    view_start = torch.empty_like(widths)
    view_start[order] = torch.cumsum(widths[order], 0) - widths[order]
    text = real // longest
    token_start = torch.cumsum(lengths, 0) - lengths
    real_at = view_start[text] + torch.arange(tokens, device=dev) - token_start[text]  # each token's view row
    gather = torch.zeros(int(widths.sum()), dtype=torch.long, device=dev)  # unused rows read token 0, masked
    gather[real_at] = torch.arange(tokens, device=dev)
    groups = []
    at = done = 0
    for width, n in zip(*(t.tolist() for t in torch.unique_consecutive(widths[order], return_counts=True))):
        keys = torch.arange(width, device=dev) < lengths[order[done : done + n], None]
        groups.append((at, n, width, keys[:, None, None, :]))
        at, done = at + n * width, done + n
    back = torch.cat([real_at, real.new_zeros(spare)]) if spare else real_at
    return AttentionViews(gather, groups, back)
