"""Teacher tokens drawn per position, reproducibly: the draws depend only on the seed, the row id
and the position, never on batching, resumes, ranks or devices.

Each position gets a 64-bit key, a hash of (seed, id, position); sample j's uniform number is a
hash of (key, j). A draw inverts the cumulative distribution of the position's probabilities
at that number, in two levels so that no (n, V) float64 tensor is needed: the block of 64
entries whose cumulative mass first exceeds it, then the entry within that block (both sums in
float64). Hashes are
SplitMix64's finalizer, computed in int64 with logical shifts (torch has no uint64 arithmetic;
int64 products wrap as two's complement on every backend).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch

_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BLOCK = 64  # entries per block of the two-level inversion
_SAMPLE_CHUNK = 64  # samples inverted at once (bounds the (n, s, BLOCK) tensors)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 bit patterns: every input bit moves every output bit."""
    x = x ^ _srl(x, 30)
    x = x * _signed(_M1)
    x = x ^ _srl(x, 27)
    x = x * _signed(_M2)
    return x ^ _srl(x, 31)


def row_keys(ids: pa.Array, seed: int) -> np.ndarray:
    """(rows,) int64 keys of a unit's row ids under `seed`: integer ids by value, string ids by
    the first 8 bytes of their BLAKE2b digest."""
    if pa.types.is_integer(ids.type):
        values = torch.from_numpy(ids.to_numpy(zero_copy_only=False).astype(np.int64))
    else:
        digests = [
            int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
            for v in ids.to_pylist()
        ]
        values = torch.tensor([_signed(d) for d in digests], dtype=torch.int64)
    seeded = mix(torch.tensor(_signed(seed * _GOLDEN + 1), dtype=torch.int64))
    return mix(values ^ seeded).numpy()


def position_keys(row_key: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(n,) keys of positions: their row's key with the position mixed in."""
    return mix(row_key ^ mix(position.to(torch.int64) + _signed(_GOLDEN)))


def uniforms(keys: torch.Tensor, samples: int) -> torch.Tensor:
    """(n, samples) float64 numbers in [0, 1), one per (position key, sample index)."""
    j = torch.arange(1, samples + 1, dtype=torch.int64, device=keys.device)
    bits = mix(keys.unsqueeze(1) + j * _signed(_GOLDEN))
    return _srl(bits, 11).double() * 2.0**-53


def draw(
    weights: torch.Tensor, keys: torch.Tensor, samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, samples) int64 ids drawn with replacement in proportion to the (n, V) non-negative
    `weights` (left as they are), and each row's (n, 1) float64 total weight."""
    n, vocab = weights.shape
    whole = vocab // BLOCK
    # Block sums of the whole blocks, then the last, partial block: one pass, and no padded copy.
    # Summed in float32 (64 terms: within 4e-6 of the exact sum; float64 sums ran 6x slower on
    # a CPU), accumulated across blocks in float64.
    sums = [weights[:, : whole * BLOCK].view(n, whole, BLOCK).sum(dim=-1)]
    if whole * BLOCK < vocab:
        sums.append(weights[:, whole * BLOCK :].sum(dim=-1, keepdim=True))
    cdf = torch.cat(sums, dim=1).double().cumsum_(dim=1)
    total = cdf[:, -1:]
    target = uniforms(keys, samples) * total
    # right=True: the first block whose cumulative weight exceeds the target (never an empty one)
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    offsets = torch.arange(BLOCK, device=weights.device)
    ids = torch.empty((n, samples), dtype=torch.int64, device=weights.device)
    for s in range(0, samples, _SAMPLE_CHUNK):
        part = slice(s, s + _SAMPLE_CHUNK)
        index = block[:, part].unsqueeze(-1) * BLOCK + offsets  # (n, s, BLOCK)
        inside = index < vocab  # the last block may be partial
        entries = weights.gather(1, index.clamp(max=vocab - 1).flatten(1)).view(index.shape)
        entries = torch.where(inside, entries, 0)
        inner = entries.cumsum(dim=-1, dtype=torch.float64)
        rest = (target[:, part] - before[:, part]).unsqueeze(-1)
        within = torch.searchsorted(inner, rest, right=True)
        # A target past the block's float64 total (its float32 sum rounded up) takes the block's
        # last entry that has weight, never one without.
        last = torch.where(entries > 0, offsets, -1).amax(dim=-1, keepdim=True)
        within = torch.minimum(within, last)
        ids[:, part] = index.gather(2, within).squeeze(-1)
    return ids.clamp_(max=vocab - 1), total  # the clamp: rounding past the last entry
