"""Logits -> per-position statistics, on the device and in float32 whatever the model dtype.

For each scored position: `logsumexp` and the `entropy` over the whole output vocabulary, the
top-k logits and ids (descending), the top-1 log-probability (for calibration), and for the
actual next token its log-probability and rank (how many vocabulary entries score strictly
higher). In full mode the logits themselves are kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def reduce_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    output_dtype: torch.dtype,
    full: bool,
    scratch: torch.Tensor | None = None,
    tokens: bool = True,
    moments: bool = False,
) -> dict[str, torch.Tensor]:
    """Statistics for (n, V) logits and their (n,) next-token labels (-1: no token).

    `scratch`, an (n, V) float32 buffer, holds the log-probabilities; when it is given the
    caller reuses `logits`' storage too, so full-mode logits are copied out. `tokens=False`
    (no position has a next token, as in seq2seq `start` mode) skips the token statistics.
    `k=0` keeps no top-k (document scores need only the top-1); `moments=True` adds the spread
    of log p over the vocabulary, `logprob_std`, which Min-K%++ divides by.
    """
    logits = logits.float()
    # log_softmax is one fused pass on CPU and GPU, where torch.logsumexp is several (measured
    # about 2x slower on CPU). logsumexp follows from any entry: logit - logprob, taken at the
    # top-1 entry, where the difference loses least precision.
    logprobs = torch.log_softmax(logits, dim=-1, out=scratch)
    has_token = labels >= 0
    token_logprob = logprobs.gather(1, labels.clamp(min=0).unsqueeze(1))
    out = {"has_token": has_token, "token_logprob": token_logprob.squeeze(1)}
    if full or k == 0:
        top1 = logits.argmax(dim=-1, keepdim=True)
        if full:
            out["logits"] = logits.to(output_dtype, copy=scratch is not None)
    else:
        # CUDA's own top-k is a fast radix select; the block pass is measured on CPUs only.
        on_cpu = logits.device.type == "cpu"
        values, ids = topk_by_blocks(logits, k) if on_cpu else logits.topk(k, dim=-1)
        top1 = ids[:, :1]
        out["topk_logits"] = values.to(output_dtype)
        out["topk_ids"] = ids.to(torch.int32)
    top1_logprob = logprobs.gather(1, top1)
    out["logsumexp"] = (logits.gather(1, top1) - top1_logprob).squeeze(1)
    out["top1_logprob"] = top1_logprob.squeeze(1)
    # With `scratch` the logits buffer is the caller's to reuse (full-mode logits were copied
    # out), so it takes the counts and probabilities; else they get a buffer of their own.
    spare = logits if scratch is not None else torch.empty_like(logprobs)
    if tokens:  # entries strictly above the token's log-probability, counted as floats:
        # several times faster on CPU than summing a bool tensor; exact up to 2**24 entries
        rank = torch.gt(logprobs, token_logprob, out=spare).sum(dim=1)
        out["token_rank"] = rank.to(torch.int32)
    else:  # all null in the output; zeros keep the arrays' shapes and dtypes
        out["token_rank"] = torch.zeros_like(has_token, dtype=torch.int32)
    out.update(_spread(logprobs, spare, moments))
    return out


def _spread(logprobs: torch.Tensor, spare: torch.Tensor, moments: bool) -> dict[str, torch.Tensor]:
    """Entropy -sum p log p over the vocabulary and, with `moments`, the standard deviation of
    log p under p. Overwrites `logprobs` and `spare`, two (n, V) buffers."""
    # A masked entry (logit -inf) has p = 0 and adds nothing, but 0 * -inf is nan; every
    # log p below -1e4 has p = 0 in float32.
    logprobs.clamp_(min=-1e4)
    p = torch.exp(logprobs, out=spare)
    if not moments:
        return {"entropy": p.mul_(logprobs).sum(dim=1).neg_()}
    mean = torch.bmm(p.unsqueeze(1), logprobs.unsqueeze(2)).view(-1)  # sum p log p
    # Centred, sum p (log p - mean)^2: the shortcut sum p (log p)^2 - mean^2 cancels badly for
    # flat distributions (measured 0.3% off float64 at a std of 0.05).
    variance = logprobs.sub_(mean.unsqueeze(1)).square_().mul_(p).sum(dim=1)
    return {"entropy": -mean, "logprob_std": variance.sqrt_()}


def reduce_states(
    head: Callable[..., torch.Tensor],
    states: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    output_dtype: torch.dtype,
    full: bool,
    vocab_size: int,
    chunk_bytes: int | None = None,
    logits_out: torch.Tensor | None = None,
    tokens: bool = True,
    moments: bool = False,
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
    buffers = None
    if on_cpu and states.shape[0] > step:
        # Two buffers reused by every chunk: on CPU each fresh (step, V) tensor is a malloc of
        # megabytes, and their churn fragmented glibc's heap into gigabytes of resident memory.
        buffers = [torch.empty((step, vocab_size), dtype=torch.float32) for _ in range(2)]
    parts = []
    for i in range(0, max(1, states.shape[0]), step):
        chunk = states[i : i + step]
        if buffers is None:
            part = reduce_logits(
                head(chunk), labels[i : i + step], k, output_dtype, full, None, tokens, moments
            )
        else:
            logits_buffer, scratch = (b[: chunk.shape[0]] for b in buffers)
            logits = head(chunk, out=logits_buffer)
            part = reduce_logits(
                logits, labels[i : i + step], k, output_dtype, full, scratch, tokens, moments
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
