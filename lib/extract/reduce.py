"""Logits -> per-position statistics, on the device and in float32 whatever the model dtype.

For each scored position: `logsumexp` and the `entropy` over the whole output vocabulary, the
top-k logits and ids (descending), the top-1 log-probability (for calibration), and for the
actual next token its log-probability and rank (how many vocabulary entries score strictly
higher). With `top_p` below 1, `topk_count` says how many of the top-k entries to keep. In full
mode the logits themselves are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lib.config import OutputConfig
from lib.errors import UserError
from lib.extract import sampling

# Float32 logits held at once per chunk of positions. On a GPU the chunk bounds memory for
# large vocabularies. On a CPU the head's matrix product wants many rows: on 2 cores with a
# 32k vocabulary and d_model 256, head plus reduction took 3.9-4.2 s at 32 MB (256 positions)
# against 5.0-5.2 s at 8 MB (64 positions); 64 MB gained nothing more.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}
# With a small vocabulary 32 MB is tens of thousands of positions, and every pass of the
# reduction then streams from memory instead of cache: with 600 entries on 2 cores, 2,048
# positions (5 MB) reduced 230-240k positions/s against 183k at 32 MB (14k positions).
CPU_MAX_POSITIONS = 2048
# Top-k on a CPU goes through the maxima of blocks of this many logits (see topk_by_blocks).
TOPK_BLOCK = 64


@dataclass(frozen=True)
class ReduceSpec:
    """What the reduction keeps of each position, decided once from the output config."""

    k: int  # top-k entries; 0: none (document rows need only the top-1)
    output_dtype: torch.dtype  # of the stored logits
    full: bool = False  # keep the logits themselves
    moments: bool = False  # `logprob_std`, which Min-K%++ divides by (document rows)
    top_p: float = 1.0  # below 1: `topk_count`, the entries holding this mass (kept_counts)
    min_k: int = 1  # with top_p: keep at least this many
    probes: tuple[int, ...] = ()  # token ids: `probe_logprobs`
    temperatures: tuple[float, ...] = ()  # `logsumexp_t`, logsumexp(logits / T) per T
    samples: int = 0  # `sample_ids` and `sample_logprobs` (lib.extract.sampling)
    sample_temperature: float = 1.0
    seed: int = 0  # of the draws

    @property
    def teacher(self) -> bool:
        """Whether any of the teacher columns (probes, temperatures, samples) is asked for."""
        return bool(self.probes or self.temperatures or self.samples)

    @property
    def teacher_buffer(self) -> bool:
        """Whether the teacher columns need an (n, V) buffer: a temperature other than 1."""
        other = [t for t in self.temperatures if t != 1]
        return bool(other or (self.samples and self.sample_temperature != 1))


def probe_ids(tokenizer, probes: list[str]) -> tuple[int, ...]:
    """The token id of each probe string; each must be exactly one token of the tokenizer."""
    ids = []
    for probe in probes:
        found = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            pieces = tokenizer.convert_ids_to_tokens(found)
            raise UserError(
                f"config key output.probes: {probe!r} is {len(found)} tokens {pieces}, not one; "
                "a probe must be exactly one token (mind a leading space: ' yes')"
            )
        ids.append(found[0])
    return tuple(ids)


def spec_for(output: OutputConfig, probes: tuple[int, ...] = ()) -> ReduceSpec:
    """What the output section asks of the reduction (`probes`: output.probes' token ids)."""
    tokens = output.level != "documents"
    return ReduceSpec(
        k=output.k if tokens else 0,
        # compact rows quantize float32 log-probabilities; plain rows store the logits as set
        output_dtype=torch.float32
        if output.encoding == "compact"
        else getattr(torch, output.dtype),
        full=output.logits == "full" and tokens,
        moments=output.level != "tokens",
        top_p=output.top_p,
        min_k=output.min_k,
        probes=probes,
        temperatures=tuple(output.temperatures),
        samples=output.samples,
        sample_temperature=output.sample_temperature,
        seed=output.seed,
    )


def chunk_positions(vocab_size: int, chunk_bytes: int) -> int:
    """How many positions' float32 logits fit in `chunk_bytes`, at least one."""
    return max(1, chunk_bytes // (4 * vocab_size))


def topk_by_blocks(
    logits: torch.Tensor, k: int, block: int = TOPK_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits.topk(k, dim=-1)`'s values (sorted), about 2x faster on a CPU for large vocabularies.

    The ids are the same except among equal values, whose order neither function specifies.

    Every top-k entry lies in one of the k blocks with the largest maxima: those k maxima are k
    entries at least as large as the k-th block maximum, so the k-th largest entry is too, and so
    is the maximum of any block holding a top-k entry. One pass takes the block maxima; the exact
    top-k then runs over those k blocks (and the few entries after the last whole block) instead
    of the whole vocabulary.
    """
    rows, vocab = logits.shape
    whole = vocab // block
    if whole < 4 * k:  # too few blocks to save anything
        return logits.topk(k, dim=-1)
    maxima = logits[:, : whole * block].unflatten(1, (whole, block)).amax(dim=-1)
    chosen = maxima.topk(k, dim=-1).indices
    offsets = torch.arange(block, device=logits.device)
    candidates = (chosen.unsqueeze(-1) * block + offsets).flatten(1)
    if whole * block < vocab:
        tail = torch.arange(whole * block, vocab, device=logits.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, picked = logits.gather(1, candidates).topk(k, dim=-1)
    return values, candidates.gather(1, picked)


def kept_counts(
    topk_logits: torch.Tensor, logsumexp: torch.Tensor, top_p: float, min_k: int
) -> torch.Tensor:
    """How many entries of each (descending) top-k row to keep: the shortest prefix whose
    probability mass reaches `top_p`, at least `min_k` and at most k.

    In float32 the running mass is within about 1e-6 of its float64 value (k terms, each with
    float32's relative error), so the count is exact unless the float64 mass of a prefix lies
    that close to `top_p`.
    """
    mass = (topk_logits.float() - logsumexp.unsqueeze(-1)).exp().cumsum(dim=-1)
    below = (mass < top_p).sum(dim=-1)
    return (below + 1).clamp(min_k, topk_logits.shape[-1]).to(torch.int32)


def reduce_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    spec: ReduceSpec,
    *,
    scratch: torch.Tensor | None = None,
    spare: torch.Tensor | None = None,
    tokens: bool = True,
    keys: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics for (n, V) logits and their (n,) next-token labels (-1: no token).

    `keys` are the positions' sampling keys (lib.extract.sampling), needed with `spec.samples`.
    `scratch`, an (n, V) float32 buffer, holds the probabilities; when it is given the caller
    reuses `logits`' storage too (the counts overwrite it), so full-mode logits are copied out.
    `tokens=False` (no position has a next token, as in seq2seq `start` mode) skips the token
    statistics. `spec.moments` and `spec.teacher_buffer` need a third (n, V) buffer, `spare`
    (allocated when not given).
    """
    # long: one pass over the vocabulary per statistic, buffers reused in place; split, the
    # order of the in-place steps would be spread over several functions
    k, full, moments = spec.k, spec.full, spec.moments
    logits = logits.float()
    # softmax is one fused pass, as log_softmax is; with the probabilities the entropy is a
    # single multiply-sum with the logits, H = logsumexp - sum p x, with no exp pass of its own
    # (an exp of log_softmax cost GPT-2 d256 a quarter of its CPU throughput).
    probs = torch.softmax(logits, dim=-1, out=scratch)
    has_token = labels >= 0
    token_logit = logits.gather(1, labels.clamp(min=0).unsqueeze(1))
    out = {"has_token": has_token}
    if full or k == 0:
        top1 = logits.argmax(dim=-1, keepdim=True)
        if full:
            out["logits"] = logits.to(spec.output_dtype, copy=scratch is not None)
    else:
        # CUDA's own top-k is a fast radix select; the block pass is measured on CPUs only.
        on_cpu = logits.device.type == "cpu"
        values, ids = topk_by_blocks(logits, k) if on_cpu else logits.topk(k, dim=-1)
        top1 = ids[:, :1]
        out["topk_logits"] = values.to(spec.output_dtype)
        out["topk_ids"] = ids.to(torch.int32)
    top1_logit = logits.gather(1, top1)
    # max + log(sum exp(x - max)), read off the top-1 entry, whose probability is at least 1/V
    lse = top1_logit - probs.gather(1, top1).log()
    out["logsumexp"] = lse.squeeze(1)
    if spec.top_p < 1 and "topk_logits" in out:
        out["topk_count"] = kept_counts(values, out["logsumexp"], spec.top_p, spec.min_k)
    out["top1_logprob"] = (top1_logit - lse).squeeze(1)
    out["token_logprob"] = (token_logit - lse).squeeze(1)
    if spec.teacher:  # before the steps below reuse the logits' and probabilities' storage
        if spare is None and spec.teacher_buffer:
            spare = torch.empty_like(logits)
        out |= teacher_columns(logits, probs, top1_logit, lse, spec, keys, spare)
    token_rank = None
    if moments:
        # Moments of x - x_top1 under p (log p is x shifted, so its variance is theirs): with
        # the shift the one-pass sum p y^2 - (sum p y)^2 keeps its precision for flat and
        # peaked distributions alike (unshifted it was 0.3% off float64 at a std of 0.05).
        shifted = logits.sub_(top1_logit) if scratch is not None else logits - top1_logit
        weighted = torch.mul(probs, shifted, out=spare)
        mean = weighted.sum(dim=1)
        second = weighted.mul_(shifted).sum(dim=1)
        mean, second = _masked(mean, second, shifted)
        out["logprob_std"] = (second - mean * mean).clamp_(min=0).sqrt_()
        out["entropy"] = (lse - top1_logit).squeeze(1) - mean
        # the token's own entry, shifted by the same subtraction, stays equal to it
        token_rank = _rank(shifted, token_logit - top1_logit, probs, tokens, in_place=True)
    else:
        mean, _ = _masked(probs.mul_(logits).sum(dim=1), None, logits)  # probs are spent
        out["entropy"] = lse.squeeze(1) - mean
        # last, as it may count in place in the logits: the caller's when `scratch` is given
        token_rank = _rank(logits, token_logit, probs, tokens, in_place=scratch is not None)
    out["token_rank"] = token_rank
    return out


def teacher_columns(
    logits: torch.Tensor,
    probs: torch.Tensor,
    top1_logit: torch.Tensor,
    lse: torch.Tensor,
    spec: ReduceSpec,
    keys: torch.Tensor | None,
    buffer: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Probe log-probabilities, logsumexp at each temperature, and sampled ids with their
    log-probabilities, from float32 (n, V) logits, their probabilities, (n, 1) maximum and
    logsumexp; `buffer` (n, V) holds the weights at another temperature."""
    out = {}
    if spec.probes:
        index = torch.tensor(spec.probes, dtype=torch.int64, device=logits.device)
        out["probe_logprobs"] = logits.index_select(1, index) - lse
    if spec.temperatures:
        out["logsumexp_t"] = torch.cat(
            [_logsumexp_at(t, logits, top1_logit, lse, buffer) for t in spec.temperatures], dim=1
        )
    if spec.samples:
        tau = spec.sample_temperature
        # At T = 1 the softmax already computed is the distribution: no pass of its own.
        weights = probs if tau == 1 else _weights_at(tau, logits, top1_logit, buffer)
        ids, total = sampling.draw(weights, keys, spec.samples)
        drawn = logits.gather(1, ids)
        if tau == 1:
            logprobs = drawn - lse
        else:  # log of exp((x - max) / T) / total
            logprobs = (drawn - top1_logit) / tau - total.log().float()
        out["sample_ids"], out["sample_logprobs"] = ids.to(torch.int32), logprobs
    return out


def _weights_at(
    t: float, logits: torch.Tensor, top1_logit: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """exp((x - max) / t) into `buffer`: unnormalized probabilities at temperature t, in two
    passes (the largest is 1, so nothing that matters underflows)."""
    return torch.add(top1_logit * (-1 / t), logits, alpha=1 / t, out=buffer).exp_()


def _logsumexp_at(
    t: float,
    logits: torch.Tensor,
    top1_logit: torch.Tensor,
    lse: torch.Tensor,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """(n, 1) logsumexp(x / t) = max / t + log sum exp((x - max) / t); at t = 1, `lse`."""
    if t == 1:
        return lse
    return top1_logit / t + _weights_at(t, logits, top1_logit, buffer).sum(-1, keepdim=True).log()


def _rank(
    logits: torch.Tensor,
    token_logit: torch.Tensor,
    buffer: torch.Tensor,
    tokens: bool,
    *,
    in_place: bool,
) -> torch.Tensor:
    """Entries strictly above the token's logit, counted as floats (several times faster on
    CPU than summing a bool tensor; exact up to 2**24 entries), in place in `logits` or into
    `buffer`."""
    if not tokens:  # all null in the output; zeros keep the arrays' shapes and dtypes
        return torch.zeros(logits.shape[0], dtype=torch.int32, device=logits.device)
    if in_place:
        above = logits.sub_(token_logit).gt_(0)
    else:
        above = torch.gt(logits, token_logit, out=buffer)
    return above.sum(dim=1).to(torch.int32)


def _masked(
    mean: torch.Tensor, second: torch.Tensor | None, shifted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean (and second moment) of `shifted` under p, with the rows that have masked
    entries (logit -inf, p = 0, and 0 * inf is nan) computed again without them. Such rows are
    rare: this costs nothing otherwise. (The shift is the same for every entry of a row, so p
    follows from `shifted` alone.)"""
    bad = mean.isnan().nonzero().squeeze(1)
    if len(bad) == 0:
        return mean, second
    y = shifted.index_select(0, bad).double()
    p = torch.softmax(y, dim=-1)
    y = torch.where(p > 0, y, torch.zeros_like(y))
    mean = mean.index_copy(0, bad, (p * y).sum(dim=1).to(mean.dtype))
    if second is not None:
        second = second.index_copy(0, bad, (p * y * y).sum(dim=1).to(second.dtype))
    return mean, second


def _buffers(spec: ReduceSpec, step: int, vocab_size: int) -> list[torch.Tensor]:
    """(step, V) float32 buffers reused by every chunk on a CPU: the logits, the probabilities,
    and a spare for the moments or another temperature. Each fresh (step, V) tensor is a malloc
    of megabytes, and their churn fragmented glibc's heap into gigabytes of resident memory."""
    count = 3 if spec.moments or spec.teacher_buffer else 2
    return [torch.empty((step, vocab_size), dtype=torch.float32) for _ in range(count)]


def reduce_states(
    head: Callable[..., torch.Tensor],
    states: torch.Tensor,
    labels: torch.Tensor,
    spec: ReduceSpec,
    *,
    vocab_size: int,
    chunk_bytes: int | None = None,
    logits_out: torch.Tensor | None = None,
    tokens: bool = True,
    keys: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run `head` and `reduce_logits` over `states` in chunks of positions and concatenate.

    `head(states, out=None)` maps a chunk of states to logits, writing into `out` if it can.
    In full mode, `logits_out` (an (N, V) host tensor, pinned) receives each chunk's logits by
    an asynchronous copy as soon as the chunk is done, so the device never holds more than a
    chunk of them; the caller synchronises before reading it.
    """
    on_cpu = states.device.type == "cpu"
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES["cpu" if on_cpu else "cuda"]
    step = chunk_positions(vocab_size, chunk_bytes)
    if on_cpu:
        step = min(step, CPU_MAX_POSITIONS)
    buffers = _buffers(spec, step, vocab_size) if on_cpu and states.shape[0] > step else None
    parts = []
    for i in range(0, max(1, states.shape[0]), step):
        chunk, chunk_labels = states[i : i + step], labels[i : i + step]
        chunk_keys = None if keys is None else keys[i : i + step]
        if buffers is None:
            part = reduce_logits(head(chunk), chunk_labels, spec, tokens=tokens, keys=chunk_keys)
        else:
            logits_buffer, scratch, *spare = (b[: chunk.shape[0]] for b in buffers)
            logits = head(chunk, out=logits_buffer)
            part = reduce_logits(
                logits,
                chunk_labels,
                spec,
                scratch=scratch,
                spare=spare[0] if spare else None,
                tokens=tokens,
                keys=chunk_keys,
            )
        if logits_out is not None:
            logits_out[i : i + step].copy_(part.pop("logits"), non_blocking=True)
        parts.append(part)
    out = (
        parts[0]
        if len(parts) == 1
        else {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    )
    if logits_out is not None:
        out["logits"] = logits_out
    return out
