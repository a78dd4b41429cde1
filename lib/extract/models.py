"""Load a checkpoint with its tokenizer, and run the no-label forward pass for each task.

The LM head is split from the body: the body runs on the padded batch, and the head runs
only on the positions that become output rows, in chunks (see `lib.extract.reduce`). That keeps a
long batch over a large vocabulary from materialising (B, T, V) logits. Models whose head
does more than one projection (logit soft-capping, scaling) fall back to the model's own
full forward, detected at load time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lib.config import DecoderConfig, JobConfig, ModelConfig
from lib.errors import UserError
from lib.extract import attention, batching, hub
from lib.extract.batching import Batch

log = logging.getLogger(__name__)

# Class-name endings of the heads this job can use; older checkpoints name e.g. T5WithLMHeadModel.
_LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "WithLMHead")

# Config attributes that mean the logits are post-processed after the output projection.
_POST_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


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
        # emulated bfloat16 (before Ampere) is slow and misses the fast attention kernels
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def is_seq2seq_config(config) -> bool:
    """True for seq2seq, False for causal; a UserError for anything else."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    auto_map = getattr(config, "auto_map", None) or {}
    path = getattr(config, "name_or_path", "") or "?"
    neither = f"model.path {path}: the checkpoint (model type {model_type!r}"
    # The saved architecture says which head the weights are for: a BertModel or a
    # BertForMaskedLM checkpoint would load as BertLMHeadModel with a random or bidirectional head.
    architectures = getattr(config, "architectures", None) or []
    mappings = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    known = {
        name
        for mapping in mappings
        for names in mapping.values()
        for name in ([names] if isinstance(names, str) else names)
    }
    if architectures and not any(
        a in known or a.endswith(_LM_HEAD_SUFFIXES) for a in architectures
    ):
        raise UserError(
            f"{neither}, architecture {', '.join(architectures)}) is neither a "
            "seq2seq LM nor a causal LM; this job needs one of the two"
        )
    if getattr(config, "is_encoder_decoder", False) and (
        model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        or "AutoModelForSeq2SeqLM" in auto_map
    ):
        return True
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        if encoder and getattr(config, "is_decoder", None) is False:
            raise UserError(
                f"{neither}) is an encoder that attends in both directions "
                "(is_decoder is false), not a causal LM"
            )
        return False
    raise UserError(f"{neither}) is neither a seq2seq LM nor a causal LM")


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
        try:
            with _body_only(lm):
                hidden = lm.model(**kwargs, use_cache=False).logits
            split = lm.head(hidden).float()
        except Exception as exc:  # e.g. a forward that reads lm_head.weight (Mamba) or upcasts
            log.info("model head: the body alone does not run (%s)", exc)
            return False
    if split.shape != reference.shape:
        return False
    tolerance = 1e-4 if lm.dtype == torch.float32 else 2e-2
    scale = max(1.0, reference.abs().max().item())
    return bool((split - reference).abs().max().item() <= tolerance * scale)


def _load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    with hub.about_the_checkpoint(cfg):
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, **hub.hub_options(cfg))
    if len(tokenizer) < 4:  # transformers builds an empty tokenizer when the files are missing
        raise UserError(
            f"model.path {cfg.path}: no usable tokenizer (the one found has "
            f"{len(tokenizer)} token(s)); the checkpoint needs its tokenizer files, "
            "e.g. tokenizer.json"
        )
    return tokenizer


def _check_tokenizer_fits(cfg: ModelConfig, tokenizer, model: nn.Module) -> None:
    """Refuse a tokenizer whose ids reach past the input embeddings: the first batch holding
    such an id would fail with an IndexError (on a GPU, a device-side assert) mid-run."""
    try:
        embeddings = getattr(model.get_input_embeddings(), "weight", None)
    except NotImplementedError:  # a custom model class may not say where its embeddings are
        return
    if embeddings is None or len(tokenizer) <= embeddings.shape[0]:
        return
    size, rows = len(tokenizer), embeddings.shape[0]
    ids = f"token id {rows}" if size == rows + 1 else f"token ids {rows}-{size - 1}"
    raise UserError(
        f"model.path {cfg.path}: the tokenizer has {size} tokens but the model's input "
        f"embeddings only {rows} rows; {ids} would index past them (tokens added to the "
        "tokenizer without resizing the model?)"
    )


def _load_weights(cfg: ModelConfig, config, is_seq2seq: bool, dtype: torch.dtype) -> nn.Module:
    """The model with SDPA attention where it has it; refuses a checkpoint with missing weights."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_class = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    kwargs = dict(
        config=config,
        dtype=dtype,
        **hub.hub_options(cfg),
        use_safetensors=None if cfg.allow_pickle else True,
        output_loading_info=True,
    )
    verbosity = transformers.utils.logging.get_verbosity()
    # Its multi-line load report is about missing weights, which are an error below.
    transformers.utils.logging.set_verbosity_error()
    try:
        with hub.about_the_checkpoint(cfg, weights=True):
            try:
                model, info = model_class.from_pretrained(
                    cfg.path, attn_implementation="sdpa", **kwargs
                )
            except ValueError as exc:
                if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
                    raise
                model, info = model_class.from_pretrained(cfg.path, **kwargs)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(
            f"model.path {cfg.path}: the checkpoint lacks {len(missing)} weight(s) of "
            f"{type(model).__name__} (e.g. {missing[0]}); they would be random, so the "
            "logits would mean nothing"
        )
    if info.get("unexpected_keys"):
        log.info(
            "ignored %d checkpoint weight(s) that %s does not use",
            len(info["unexpected_keys"]),
            type(model).__name__,
        )
    return model


def _special_ids(cfg: ModelConfig, config, model, tokenizer, is_seq2seq: bool):
    """The pad id, the EOS ids and (seq2seq) the decoder start id."""
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
    return int(pad_id), eos_ids, start


def load_model(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """Load tokenizer and model from a hub id or a local directory, pick the family, move it."""
    if cfg.path.startswith("~"):  # as input.path and output.dir are
        cfg = dataclasses.replace(cfg, path=os.path.expanduser(cfg.path))
    asked = cfg
    cfg = hub.unreachable_hub(cfg)
    if cfg is not asked:
        try:
            lm = _load(cfg, device)
        except UserError:
            raise UserError(
                f"model.path {cfg.path}: the hub cannot be reached and this model is not in "
                "the local cache; download it where there is a network (or copy the cache), "
                "then run with HF_HUB_OFFLINE=1, or give model.path a local directory"
            ) from None
        log.warning("the hub cannot be reached; loaded %s from the local cache", cfg.path)
        return lm
    return _load(cfg, device)


def _load(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """load_model's work, with the hub options settled."""
    import transformers
    from transformers import AutoConfig

    # A progress bar on stderr would turn a later one-line error into several lines.
    transformers.utils.logging.disable_progress_bar()
    with hub.about_the_checkpoint(cfg):
        config = AutoConfig.from_pretrained(cfg.path, **hub.hub_options(cfg))
    is_seq2seq = is_seq2seq_config(config)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.float16 and config.model_type in ("t5", "mt5", "umt5", "longt5"):
        log.warning("model.dtype=float16 with a T5-family model overflows to inf/nan; use bfloat16")
    tokenizer = _load_tokenizer(cfg)
    model = _load_weights(cfg, config, is_seq2seq, dtype)
    _check_tokenizer_fits(cfg, tokenizer, model)
    model.eval().requires_grad_(False).to(device)
    # T5's padded batches otherwise build a (batch, heads, length, length) bias in every layer.
    if attention.use_key_mask_attention(model):
        log.info("attention: %s, without a per-row bias tensor", attention.NAME)
    # With few decoder positions (start mode: one) the decoder would otherwise project every
    # encoder state in every layer.
    if attention.use_folded_cross_attention(model):
        log.info("attention: cross-attention folded into the decoder's queries")
    head = model.get_output_embeddings()
    vocab_size = int(head.weight.shape[0] if head is not None else config.vocab_size)
    pad_id, eos_ids, start = _special_ids(cfg, config, model, tokenizer, is_seq2seq)
    head_attr = _head_attr(model)
    lm = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        is_seq2seq=is_seq2seq,
        vocab_size=vocab_size,
        pad_id=pad_id,
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
            "commit": hub.snapshot_commit(cfg),
            "vocab_size": vocab_size,
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


def position_limit(lm: LoadedModel) -> int | None:
    """The most positions the model's learned or rotary position table covers; None when it
    has none (T5's relative positions)."""
    if lm.model.config.model_type in ("t5", "mt5", "umt5", "longt5"):
        return None
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_lengths(lm: LoadedModel, task: str, max_length: int, max_new_tokens: int) -> None:
    """Refuse, before any model work, lengths the model's positions cannot hold: past them a
    learned table fails with an index error, and a rotary one is out of what it was trained on."""
    limit = position_limit(lm)
    if limit is None:
        return
    if task == batching.CONTINUATION and 2 * max_length > limit:
        raise UserError(
            f"config key input.max_length: {max_length} lets context + target reach "
            f"{2 * max_length} tokens, more than the model's {limit} positions; set it to at "
            f"most {limit // 2}"
        )
    if max_length > limit:
        raise UserError(
            f"config key input.max_length: {max_length} is more than the model's {limit} "
            f"positions; set it to at most {limit}"
        )
    if task == batching.GENERATE and max_new_tokens + 1 > limit:
        raise UserError(
            f"config key decoder.max_new_tokens: {max_new_tokens} steps need more than the "
            f"model's {limit} decoder positions; set it to at most {limit - 1}"
        )


def check_windows(lm: LoadedModel, task: str, config: JobConfig) -> None:
    """`input.long_documents=windows` scores whole texts with a causal model."""
    if config.input.long_documents != "windows":
        return
    why = None
    if task != batching.CAUSAL:
        why = "seq2seq models" if lm.is_seq2seq else "input.target_column (a continuation)"
    elif config.output.rows == "examples":
        why = "output.rows=examples"
    elif lm.tokenizer.bos_token_id is None and lm.tokenizer.eos_token_id is None:
        why = "a tokenizer with neither a BOS nor an EOS token to predict the first token from"
    if why:
        raise UserError(
            f"config key input.long_documents: windows scores whole texts with a causal model, "
            f"not with {why}; use input.long_documents=truncate"
        )


def check_config(lm: LoadedModel, task: str, config: JobConfig) -> None:
    """Refuse, before any model work, what this model cannot do with this config."""
    if config.output.k > lm.vocab_size:
        raise UserError(
            f"config key output.k: {config.output.k} is larger than the vocabulary ({lm.vocab_size})"
        )
    check_lengths(lm, task, config.input.max_length, config.decoder.max_new_tokens)
    check_windows(lm, task, config)
    if config.output.level != "tokens" and task == batching.START:
        raise UserError(
            f"config key output.level: {config.output.level} needs scored tokens, and "
            "decoder.mode=start scores none (one decoder step, no target); use "
            "decoder.mode=targets or generate, or output.level=tokens"
        )


def task_for(lm: LoadedModel, decoder: DecoderConfig, has_targets: bool) -> str:
    """The task the job runs: causal or continuation for causal LMs, the decoder mode for seq2seq."""
    if not lm.is_seq2seq:
        if decoder.mode == "generate":
            raise UserError(
                f"config key decoder.mode: generate needs a seq2seq model; {lm.identity['path']} "
                "is causal (it scores its input, or input.target_column as a continuation)"
            )
        return batching.CONTINUATION if has_targets else batching.CAUSAL
    return {"start": batching.START, "targets": batching.TARGETS, "generate": batching.GENERATE}[
        decoder.mode
    ]


def scored_states(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """(N, H) head inputs (or (N, V) logits when the head is not split) at the batch's selected positions."""
    kwargs = {"input_ids": batch.input_ids}
    if lm.is_seq2seq:
        kwargs["attention_mask"] = batch.attention_mask
    # A causal model gets no mask: with right padding, causal attention already keeps every real
    # token from seeing the pads after it, and without a mask SDPA runs its causal kernel (flash
    # attention where available), whose memory grows with T rather than T^2.
    if batch.decoder_input_ids is not None:
        kwargs["decoder_input_ids"] = batch.decoder_input_ids
        kwargs["decoder_attention_mask"] = batch.decoder_attention_mask
    with _body_only(lm):
        states = lm.model(**kwargs, use_cache=False).logits
    return states.flatten(0, 1).index_select(0, batch.select)


def head_logits(
    lm: LoadedModel, states: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the output projection to a chunk of states (identity when it already ran).

    A bias-free linear head in the states' dtype writes into `out` when one is given.
    """
    if lm.head is None:
        return states
    head = lm.head
    if (
        out is not None
        and isinstance(head, nn.Linear)
        and head.bias is None
        and head.weight.dtype == states.dtype == out.dtype
    ):
        return torch.mm(states, head.weight.t(), out=out)
    return head(states)


def generate(
    lm: LoadedModel, batch: Batch, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    tokens = out.sequences[:, -logits.shape[1] :]
    if lm.eos_token_ids:
        is_eos = torch.isin(tokens, torch.tensor(lm.eos_token_ids, device=tokens.device))
        valid = (is_eos.cumsum(1) - is_eos.long()) == 0
    else:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    return logits, tokens, valid


@dataclass
class Scored:
    """What one forward pass hands the reduction, whatever the family and task.

    `states` are the head's inputs at the scored positions (or logits, with `head` the
    identity); `labels` the actual next tokens on the device (-1: none); `row`, `position` and
    `token_id` say where each goes (host arrays, or device tensors when only the forward pass
    knows them, as in generate mode).
    """

    states: torch.Tensor
    labels: torch.Tensor
    head: Callable[..., torch.Tensor]
    row: torch.Tensor
    position: torch.Tensor
    token_id: torch.Tensor
    has_tokens: bool  # False when no position has a next token (seq2seq start mode)
    real_tokens: int
    padded_tokens: int


def _identity(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return logits


def score(lm: LoadedModel, batch: Batch, task: str, max_new_tokens: int) -> Scored:
    """Run the no-label forward pass of `task` on a padded batch already on the device."""
    if task != batching.GENERATE:
        return Scored(
            states=scored_states(lm, batch),
            labels=batch.labels,
            head=functools.partial(head_logits, lm),
            row=batch.row,
            position=batch.position,
            token_id=batch.labels.to(torch.int32),
            has_tokens=task != batching.START,
            real_tokens=batch.real_tokens,
            padded_tokens=batch.padded_tokens,
        )
    logits, tokens, valid = generate(lm, batch, max_new_tokens)
    chosen = valid.flatten().nonzero().squeeze(1)
    labels = tokens.flatten().index_select(0, chosen)
    # Rows and steps are known only now, on the device.
    rows = torch.tensor([r.row for r in batch.requests], dtype=torch.int32, device=lm.device)
    steps = logits.shape[1]
    return Scored(
        states=logits.flatten(0, 1).index_select(0, chosen),
        labels=labels,
        head=_identity,  # generate already returns logits
        row=rows[chosen // steps],
        position=(chosen % steps).to(torch.int32),
        token_id=labels.to(torch.int32),
        has_tokens=True,
        real_tokens=batch.real_tokens + int(valid.sum()),
        padded_tokens=batch.padded_tokens + valid.numel(),
    )
