"""Load a checkpoint with its tokenizer, and run the no-label forward pass for each task.

The LM head is split from the body: the body runs on the padded batch, and the head runs
only on the positions that become output rows, in chunks (see `lib.reduce`). That keeps a
long batch over a large vocabulary from materialising (B, T, V) logits. Models whose head
does more than one projection (logit soft-capping, scaling) fall back to the model's own
full forward, detected at load time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lib import batching
from lib.batching import Batch
from lib.config import DecoderConfig, ModelConfig
from lib.errors import UserError

log = logging.getLogger(__name__)

# Config attributes that mean the logits are post-processed after the output projection.
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    is_seq2seq: bool
    vocab_size: int  # the logits' last dimension, which can exceed the tokenizer's size
    pad_id: int
    decoder_start_token_id: int | None
    eos_token_ids: list[int]
    head_attr: str | None  # attribute holding the output projection, None when not split
    head: nn.Module | None
    device: torch.device
    dtype: torch.dtype
    identity: dict


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def _load_error(path: str, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
    where = "a local directory" if os.path.isdir(path) else "a hub id"
    hint = ""
    if not os.path.exists(path):
        hint = (" (no such local directory; offline mode is on, so the hub was not asked)" if offline
                else " (no such local directory, and the hub could not provide it)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"model.path {path}: cannot load it as {where}{hint}: {first}")


def _task_kind(config) -> bool:
    """True for seq2seq, False for causal; a UserError for anything else."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    auto_map = getattr(config, "auto_map", None) or {}
    if getattr(config, "is_encoder_decoder", False) and (
        model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES or "AutoModelForSeq2SeqLM" in auto_map
    ):
        return True
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        return False
    raise UserError(
        f"model.path: checkpoint of type {model_type!r} is neither a seq2seq LM nor a causal LM"
    )


def _head_attr(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    if head is None:
        return None
    for name, child in model.named_children():
        if child is head:
            return name
    return None


@contextlib.contextmanager
def _body_only(lm: LoadedModel):
    """Swap the output projection for an identity, so the model returns the head's input."""
    if lm.head_attr is None:
        yield
        return
    setattr(lm.model, lm.head_attr, nn.Identity())
    try:
        yield
    finally:
        setattr(lm.model, lm.head_attr, lm.head)


def _split_head_is_exact(lm: LoadedModel) -> bool:
    """Check on a short dummy input that body + head reproduces the model's own logits."""
    if any(getattr(lm.model.config, attr, None) not in (None, 1, 1.0) for attr in _POST_HEAD_ATTRS):
        return False
    ids = torch.arange(1, 9, device=lm.device).remainder(lm.vocab_size).unsqueeze(0)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if lm.is_seq2seq:
        kwargs["decoder_input_ids"] = ids[:, :4]
    with torch.inference_mode():
        reference = lm.model(**kwargs, use_cache=False).logits.float()
        with _body_only(lm):
            hidden = lm.model(**kwargs, use_cache=False).logits
        split = lm.head(hidden).float()
    if split.shape != reference.shape:
        return False
    tolerance = 1e-4 if lm.dtype == torch.float32 else 2e-2
    scale = max(1.0, reference.abs().max().item())
    return bool((split - reference).abs().max().item() <= tolerance * scale)


def load_model(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """Load tokenizer and model from a hub id or a local directory, pick the family, move to `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"model.path {cfg.path}: the checkpoint needs custom code; "
                            "set model.trust_remote_code=true only if you trust it") from None
        raise _load_error(cfg.path, exc) from None
    except (OSError, KeyError) as exc:
        raise _load_error(cfg.path, exc) from None
    is_seq2seq = _task_kind(config)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.float16 and getattr(config, "model_type", "") in ("t5", "mt5", "umt5", "longt5"):
        warnings.warn("model.dtype=float16 with a T5-family model overflows to inf/nan; use bfloat16",
                      stacklevel=2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(cfg.path, exc) from None
    model_class = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    kwargs = dict(config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                  use_safetensors=None if cfg.allow_pickle else True)
    try:
        try:
            model = model_class.from_pretrained(cfg.path, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:
            if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
                raise
            model = model_class.from_pretrained(cfg.path, **kwargs)
    except OSError as exc:
        if not cfg.allow_pickle and "safetensors" in str(exc).lower():
            raise UserError(f"model.path {cfg.path}: no safetensors weights; pickled weights can run "
                            "code when loaded, so they need model.allow_pickle=true") from None
        raise _load_error(cfg.path, exc) from None
    model.eval().requires_grad_(False).to(device)

    vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else config.vocab_size
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # causal tokenizers often have none; padded positions are masked anyway
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    start = getattr(config, "decoder_start_token_id", None)
    if start is None and is_seq2seq:
        start = getattr(model.generation_config, "decoder_start_token_id", None)
    if is_seq2seq and start is None:
        raise UserError(f"model.path {cfg.path}: seq2seq config has no decoder_start_token_id")
    head_attr = _head_attr(model)
    lm = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        is_seq2seq=is_seq2seq,
        vocab_size=int(vocab_size),
        pad_id=int(pad_id),
        decoder_start_token_id=start,
        eos_token_ids=eos_ids,
        head_attr=head_attr,
        head=getattr(model, head_attr) if head_attr else None,
        device=device,
        dtype=dtype,
        identity={
            "path": cfg.path,
            "model_type": config.model_type,
            "architecture": type(model).__name__,
            "commit": getattr(config, "_commit_hash", None),
            "vocab_size": int(vocab_size),
            "dtype": str(dtype).removeprefix("torch."),
            "tokenizer": type(tokenizer).__name__,
            "tokenizer_size": len(tokenizer),
        },
    )
    if head_attr is not None and not _split_head_is_exact(lm):
        log.info("model head is not a plain projection; using the full forward pass")
        lm.head_attr, lm.head = None, None
    lm.identity["split_head"] = lm.head_attr is not None
    return lm


def task_for(lm: LoadedModel, decoder: DecoderConfig, has_targets: bool) -> str:
    """The task the job runs: causal or continuation for causal LMs, the decoder mode for seq2seq."""
    if not lm.is_seq2seq:
        return batching.CONTINUATION if has_targets else batching.CAUSAL
    return {"start": batching.START, "targets": batching.TARGETS, "generate": batching.GENERATE}[decoder.mode]


def scored_states(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """(N, H) head inputs (or (N, V) logits when the head is not split) at the batch's selected positions."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.decoder_input_ids is not None:
        kwargs["decoder_input_ids"] = batch.decoder_input_ids
        kwargs["decoder_attention_mask"] = batch.decoder_attention_mask
    with _body_only(lm):
        states = lm.model(**kwargs, use_cache=False).logits
    return states.flatten(0, 1).index_select(0, batch.select)


def head_logits(lm: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """Apply the output projection to a chunk of states (identity when it already ran)."""
    return states if lm.head is None else lm.head(states)


def generate(lm: LoadedModel, batch: Batch, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy decoding; returns raw per-step logits (B, S, V), tokens (B, S), and which steps count.

    A step counts up to and including the row's first EOS, as `generate` pads finished rows.
    """
    out = lm.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    logits = torch.stack(out.logits, dim=1)
    tokens = out.sequences[:, -logits.shape[1]:]
    if lm.eos_token_ids:
        is_eos = torch.isin(tokens, torch.tensor(lm.eos_token_ids, device=tokens.device))
        valid = (is_eos.cumsum(1) - is_eos.long()) == 0
    else:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    return logits, tokens, valid
