"""Logits -> per-position statistics, on the device and in float32 whatever the model dtype.

For each scored position: `logsumexp` over the whole output vocabulary, the top-k logits and
ids (descending), and for the actual next token its log-probability and rank (how many
vocabulary entries score strictly higher). In full mode the logits themselves are kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Float32 logits held at once per chunk of positions: bounds device memory for large vocabularies.
CHUNK_BYTES = 256 * 2**20


def chunk_positions(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many positions' float32 logits fit in `chunk_bytes`, at least one."""
    return max(1, chunk_bytes // (4 * vocab_size))


def reduce_logits(logits: torch.Tensor, labels: torch.Tensor, k: int, output_dtype: torch.dtype,
                  full: bool) -> dict[str, torch.Tensor]:
    """Statistics for (n, V) logits and their (n,) next-token labels (-1: no token)."""
    logits = logits.float()
    logsumexp = torch.logsumexp(logits, dim=-1)
    has_token = labels >= 0
    token_logit = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    out = {
        "logsumexp": logsumexp,
        "token_logprob": token_logit - logsumexp,
        "token_rank": (logits > token_logit.unsqueeze(1)).sum(dim=1, dtype=torch.int32),
        "has_token": has_token,
    }
    if full:
        out["logits"] = logits.to(output_dtype)
    else:
        values, ids = logits.topk(k, dim=-1, largest=True, sorted=True)
        out["topk_logits"] = values.to(output_dtype)
        out["topk_ids"] = ids.to(torch.int32)
    return out


def reduce_states(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor,
                  labels: torch.Tensor, k: int, output_dtype: torch.dtype, full: bool,
                  vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Run `head` and `reduce_logits` over `states` in chunks of positions and concatenate."""
    step = chunk_positions(vocab_size, chunk_bytes)
    parts = [
        reduce_logits(head(states[i : i + step]), labels[i : i + step], k, output_dtype, full)
        for i in range(0, max(1, states.shape[0]), step)
    ]
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
