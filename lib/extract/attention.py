"""SDPA attention for relative-position-bias models (T5) without a per-row bias tensor.

Transformers' SDPA path for T5 merges the shared position bias (1, H, L, L) with the padding
mask into a fresh (B, H, L, L) tensor in every layer. On a padded batch that dominates the
forward pass (70% of a tiny T5's time on a 32 x 512 batch) and costs B x H x L x L memory.

An encoder's padding mask only depends on the key, so two exact ways avoid that tensor:
- on a CPU, rows with the same number of real keys (runs of them: batches are sorted by length)
  attend together over just those keys, with no mask at all;
- elsewhere, the mask rides along inside the dot product: one extra head dimension, 1 in every
  query and 0 or a large negative number in every key. q.k then gains exactly 0 for real keys
  and the large negative number for padded ones, and the bias stays (1, H, L, L) and broadcasts.
Everything else goes to transformers' own SDPA function unchanged. In 16-bit dtypes the
per-key-length path rounds like each row run alone, so it differs from transformers' padded
batch in the last bits (up to 0.03 on bfloat16 logits of about 5).

A T5 decoder's cross-attention projects every encoder state to keys and values in every layer,
2 x d_model x inner MACs per encoder token, although few decoder positions may ask (one in
start mode). `use_folded_cross_attention` moves the projections to the query side instead:
q_h . (W_k,h x) = (W_k,h^T q_h) . x, and the values' weighted sum goes through W_v,h once per
query. That is about a seventh of a T5 start-mode forward, whatever the model's size.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    sdpa_mask,
)

NAME = "logit_extract_sdpa"

log = logging.getLogger(__name__)


def _key_only(mask: torch.Tensor | None) -> bool:
    """Whether a boolean 4D mask is the same for every query (a padding mask over the keys)."""
    return (
        mask is not None
        and mask.dtype == torch.bool
        and mask.dim() == 4
        and (mask.shape[-2] == 1 or mask.stride(-2) == 0)
    )


def extra_columns(query: torch.Tensor) -> int:
    """Head dimensions to add: one carries the mask, the rest keep kernels eligible."""
    # CUDA's memory-efficient kernel needs head sizes in multiples of 8 in 16-bit dtypes; the
    # CPU kernel takes any, and each extra column costs (measured: +1 ran a d64 T5 5-7% faster).
    return 8 - query.shape[-1] % 8 if query.device.type == "cuda" else 1


def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    mask_function=bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' SDPA mask, except that a plain padding mask stays a view over the keys.

    The view has stride 0 along the queries, which is how key_mask_sdpa_forward recognises it.
    """
    plain = (
        mask_function is bidirectional_mask_function
        and attention_mask is not None
        and attention_mask.dim() == 2
        and attention_mask.shape[-1] == kv_length
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
        and kwargs.get("local_size") is None
        and not kwargs.get("use_vmap")
    )
    if not plain:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    keep = attention_mask.to(torch.bool)
    if kwargs.get("allow_is_bidirectional_skip") and bool(keep.all()):
        return None
    return keep[:, None, None, :].expand(batch_size, 1, q_length, kv_length)


def attention_per_key_length(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    position_bias: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """(B, L, H, D) attention of each run of rows with the same key length, over those keys only.

    None unless the mask is one right-padding row per query row with at least one real key
    (over no keys SDPA gives zeros; transformers gives the mean of the values). One call per run:
    measured on 2 cores against the extra-dimension path, 10-50% faster for batches of 16 to 87
    runs (a d64 T5 ran 6% faster end to end, a d256 one 4%); runs are at most min(rows, width).
    """
    if attention_mask.shape[0] != query.shape[0] or attention_mask.shape[1] != 1:
        return None
    keep = attention_mask[:, 0, 0, :]
    lengths = keep.sum(dim=-1)
    right_padding = torch.arange(keep.shape[-1]) < lengths[:, None]
    if not torch.equal(keep, right_padding) or not bool((lengths > 0).all()):
        return None
    runs, counts = torch.unique_consecutive(lengths, return_counts=True)
    output = query.new_empty(query.shape[:-1] + value.shape[-1:])
    start = 0
    for length, count in zip(runs.tolist(), counts.tolist(), strict=True):
        rows = slice(start, start + count)
        bias = position_bias[rows] if position_bias.shape[0] > 1 else position_bias
        output[rows] = torch.nn.functional.scaled_dot_product_attention(
            query[rows],
            key[rows, :, :length],
            value[rows, :, :length],
            attn_mask=bias[..., :length],
            scale=scaling,
        )
        start += count
    return output.transpose(1, 2).contiguous()


def key_mask_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention like transformers' SDPA, folding a key-only padding mask into q.k when a bias is present."""
    if position_bias is None or not _key_only(attention_mask) or query.shape[1] != key.shape[1]:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            position_bias=position_bias,
            **kwargs,
        )
    head_dim = query.shape[-1]
    if scaling is None:  # SDPA's default, taken before the head dimension grows
        scaling = head_dim**-0.5
    if query.device.type == "cpu":
        output = attention_per_key_length(query, key, value, attention_mask, position_bias, scaling)
        if output is not None:
            return output, None
    extra = extra_columns(query)
    batch, heads, key_length, _ = key.shape
    keep = attention_mask[:, :, 0, :].expand(batch, heads, key_length)
    # Half the dtype's minimum: exp() of it is 0, and adding the bias cannot overflow.
    blocked = torch.finfo(key.dtype).min / 2
    key_column = torch.zeros(batch, heads, key_length, extra, dtype=key.dtype, device=key.device)
    key_column[..., 0].masked_fill_(~keep, blocked)
    query_column = torch.zeros(*query.shape[:-1], extra, dtype=query.dtype, device=query.device)
    query_column[..., 0] = 1
    value_column = torch.zeros(*value.shape[:-1], extra, dtype=value.dtype, device=value.device)
    # With a mask, transformers never makes attention causal; without one it might.
    kwargs["is_causal"] = False
    output, _ = sdpa_attention_forward(
        module,
        torch.cat([query, query_column], dim=-1),
        torch.cat([key, key_column], dim=-1),
        torch.cat([value, value_column], dim=-1),
        None,
        scaling=scaling,
        position_bias=position_bias,
        **kwargs,
    )
    # sdpa_attention_forward returns (batch, length, heads, dim); drop the added dimension.
    return output[..., :head_dim].contiguous(), None


def uses_position_bias(model: torch.nn.Module) -> bool:
    """Whether the model's attention adds a learned relative position bias (the T5 family)."""
    return any(hasattr(module, "relative_attention_bias") for module in model.modules())


def _padded_probe(model: torch.nn.Module, decoder_length: int = 3) -> torch.Tensor:
    """Float32 logits of a short padded dummy batch (the second row is half padding)."""
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids[:, :decoder_length]
    with torch.inference_mode():
        return model(**kwargs).logits.float()


def _agrees(reference: torch.Tensor, probe: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether a probe's logits equal the reference's within the model dtype's rounding."""
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    scale = max(1.0, reference.abs().max().item())
    return (probe - reference).abs().max().item() <= tolerance * scale


def use_key_mask_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA model with a position bias to key_mask_sdpa_forward; return whether it was switched.

    The switch leans on transformers' attention internals, so it is checked on a padded dummy
    batch against plain SDPA, and undone on any difference or error.
    """
    if model.config._attn_implementation != "sdpa" or not uses_position_bias(model):
        return False
    try:
        reference = _padded_probe(model)
        AttentionInterface.register(NAME, key_mask_sdpa_forward)
        AttentionMaskInterface.register(NAME, key_padding_mask)
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation == NAME and _agrees(
            reference, _padded_probe(model), model
        ):
            return True
    except Exception as exc:  # a transformers version whose internals differ
        log.info("attention: keeping transformers' SDPA (%s)", exc)
    model.set_attn_implementation("sdpa")
    return False


def _folds(queries: int, keys: int, head_dim: int) -> bool:
    """Whether folding costs fewer MACs: per head and model dimension, Q x (head_dim + L) for
    the folded products against L x head_dim for projecting the keys and values."""
    return queries * (head_dim + keys) < keys * head_dim


def folded_cross_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_value_states: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    cache: object | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """T5Attention.forward for cross-attention from a few decoder positions, without projecting
    the encoder states; anything else (self-attention, a cache, training) goes to the class's
    own forward."""
    batch, queries, _ = hidden_states.shape
    heads, head_dim = module.n_heads, module.key_value_proj_dim
    if (
        key_value_states is None
        or cache is not None
        or module.training
        or kwargs.get("output_attentions")
        or not _folds(queries, key_value_states.shape[1], head_dim)
    ):
        return type(module).forward(
            module,
            hidden_states,
            mask=mask,
            key_value_states=key_value_states,
            position_bias=position_bias,
            cache=cache,
            **kwargs,
        )
    keys, model_dim = key_value_states.shape[1], key_value_states.shape[2]
    query = module.q(hidden_states).view(batch, queries, heads, head_dim)
    key_weight = module.k.weight.view(heads, head_dim, model_dim)
    # (batch, heads x queries, model_dim): each head's query seen from the encoder states' side
    folded = torch.einsum("bqhe,hed->bhqd", query, key_weight).reshape(batch, -1, model_dim)
    # float32 scores, as SDPA keeps them: T5 does not scale them, and 16-bit would round them
    states = key_value_states.float()
    scores = torch.bmm(folded.float(), states.transpose(1, 2)).view(batch, heads, queries, keys)
    scores = scores * module.scaling
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1).to(key_value_states.dtype)
    mixed = torch.bmm(weights.view(batch, -1, keys), key_value_states)
    value_weight = module.v.weight.view(heads, head_dim, model_dim)
    output = torch.einsum(
        "bhqd,hed->bqhe", mixed.view(batch, heads, queries, model_dim), value_weight
    )
    return module.o(output.reshape(batch, queries, heads * head_dim)), position_bias, None


def _folded(module: weakref.ref, *args, **kwargs) -> tuple:
    return folded_cross_attention(module(), *args, **kwargs)


def cross_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's T5-style cross-attention modules that folding applies to (bias-free q, k,
    v projections and no relative position bias of their own)."""
    found = []
    for name, module in model.named_modules():
        linear = [getattr(module, part, None) for part in "qkvo"]
        if (
            name.startswith("decoder.")
            and name.endswith("EncDecAttention")
            and all(type(layer) is torch.nn.Linear and layer.bias is None for layer in linear)
            and not getattr(module, "has_relative_attention_bias", True)
            and isinstance(getattr(module, "n_heads", None), int)
            and isinstance(getattr(module, "key_value_proj_dim", None), int)
            and isinstance(getattr(module, "scaling", None), float)
        ):
            found.append(module)
    return found


def use_folded_cross_attention(model: torch.nn.Module) -> bool:
    """Route a T5-family decoder's cross-attention through folded_cross_attention; return
    whether it was done. Checked like use_key_mask_attention, and undone on any difference."""
    modules = cross_attentions(model) if model.config.is_encoder_decoder else []
    if not modules:
        return False
    try:
        # one decoder position, as start mode has: it folds for any head size
        reference = _padded_probe(model, decoder_length=1)
        for module in modules:
            # through a weak reference: module -> its forward -> module would be a cycle that
            # keeps a model (and its device memory) alive until a full garbage collection
            module.forward = functools.partial(_folded, weakref.ref(module))
        if _agrees(reference, _padded_probe(model, decoder_length=1), model):
            return True
    except Exception as exc:  # a transformers version whose T5 attention differs
        log.info("attention: keeping transformers' cross-attention (%s)", exc)
    for module in modules:
        module.__dict__.pop("forward", None)
    return False
