"""A BERT encoder's forward on its real tokens only: no compute on padding outside attention.

Why: requests arrive with texts of mixed lengths, so a padded batch spends every linear layer,
the activation, the residual adds and the layer norms on pad positions too. Under load the
replica's batches were about 30% padding (the scheduler's length splits trade padding for
more calls, each of which reads all the weights again). Here every token-wise operation runs
on the batch's real tokens stacked into one [tokens, hidden] matrix; only attention, the one
step that mixes positions, runs on a padded [batch, longest] view, gathered and scattered
back per layer. That is TEI's and vLLM's layout for encoders, without their GPU kernels.

On weights prepacked for oneDNN (bfloat16 on a CPU, serving/engine/packed.py) the
intermediate GELU and the two residual adds of each layer also run as post-ops of their
matmuls (`fused_linear`): computed in float32 on the accumulator, rounded to bfloat16 once,
instead of three more passes over the [tokens, 1536] activations, one of which (GELU) took a
fifth of the padded forward.

The token count is rounded up (`bucket`, at most an eighth more rows) because oneDNN builds
a kernel per matmul shape, and in a server batches rarely repeat a token count: without the
buckets the server's forwards were no cheaper than padded ones. The figures behind both
decisions are in loadtest/results/overheads.md.

Exactness: token rows of a matmul are computed independently, so without the fused post-ops
each real token's hidden state matches the padded forward's up to the kernel the matmul's
row count selects (equal bit for bit in float32 at the shapes tested); the fused post-ops
round once instead of twice (tests/test_unpadded.py bounds both against transformers'
forward and against float32).

Applies to `BertModel` (BERT, MiniLM and the sentence-transformers built on them) in eval
mode as an encoder (no decoder or cross-attention), whatever the padding side: a position is
its column in the padded batch, as in transformers. Everything else, and mixed-adapter
forwards (their per-row updates are hooks over the padded batch), runs `model(**batch)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertModel

from serving.engine.packed import fused_linear


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
    dense = tokens == rows * longest  # no padding: attention needs no gather, scatter or mask
    if not dense:
        gather = torch.zeros(rows * longest, dtype=torch.long, device=ids.device)
        gather[real] = torch.arange(tokens, device=ids.device)  # pad positions read token 0, masked out as keys
        keys = mask[:, None, None, :]
        back = torch.cat([real, real.new_zeros(spare)]) if spare else real  # attention's rows back in token order
    for layer in model.encoder.layer:
        attn = layer.attention.self
        heads, size = attn.num_attention_heads, attn.attention_head_size

        def split(t: torch.Tensor) -> torch.Tensor:
            t = t[:tokens] if dense else t.index_select(0, gather)
            return t.view(rows, longest, heads, size).transpose(1, 2)

        q, k, v = (split(fused_linear(lin, x)) for lin in (attn.query, attn.key, attn.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=None if dense else keys, scale=attn.scaling)
        ctx = ctx.transpose(1, 2).reshape(rows * longest, heads * size)
        if not dense:
            ctx = ctx.index_select(0, back)
        elif spare:
            ctx = F.pad(ctx, (0, 0, 0, spare))
        out = layer.attention.output
        a = out.LayerNorm(fused_linear(out.dense, ctx, add=x))
        inter = layer.intermediate
        h = fused_linear(inter.dense, a, act=inter.intermediate_act_fn)
        out = layer.output
        x = out.LayerNorm(fused_linear(out.dense, h, add=a))
    if dense:
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
