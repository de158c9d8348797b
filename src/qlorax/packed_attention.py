"""Attention for packed rows (training.packing): each example attends within itself, computed per
example.

transformers turns a packed row's position ids into one block-diagonal mask over the whole row,
so sdpa computes (and then masks) every example against every other: for 8 examples of ~100
tokens, 8x the attention work of the padded batch, which ate the whole saving of packing on
these machines (tiny preset, batch 8: 2650 packed vs 2850 padded tokens/s). This attention
function, registered with transformers' AttentionInterface under `qlorax_packed_sdpa` (its
extension point, with sdpa's mask builder), runs causal sdpa on each example's slice of the
row instead: the work of the padded batch without its padding. Rows that are not packed (the
padded evaluation, generation) go to transformers' own sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

NAME = "qlorax_packed_sdpa"


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, position_ids: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature; (batch, length, heads, head_dim) out."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    starts = example_starts(position_ids, query.shape[0])
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    ends = [*starts[1:], query.shape[2]]
    pieces = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling) for start, end in zip(starts, ends, strict=True)]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def example_starts(position_ids: Any, batch: int) -> list[int] | None:
    """Where each example of a packed row begins (its position id 0), or None for a row that is
    not packed (one example, or several rows: padded batches)."""
    if position_ids is None or batch != 1 or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return starts if len(starts) > 1 and starts[0] == 0 else None


def use_packed_attention(model: Any) -> None:
    """Register the function (once) and make `model` attend with it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
