"""The compact encoding of top-k rows (`output.encoding=compact`), and its decoding.

Each position keeps its entries in descending log-probability order in two list columns:

- `topk_id_codes`: each id's code in its shard's id order, the shard's distinct ids by
  descending frequency (in classes of half a power of two, by id within a class). Frequent ids
  get small codes, which BYTE_STREAM_SPLIT + zstd store in fewer bytes than the ids themselves.
  The order is in the shard's footer, under the key `ID_ORDER_KEY`.
- `topk_logprob_deltas`: each entry's log-probability code minus the previous entry's (the
  first entry: its code). Codes never decrease along a row, so the deltas are small and
  non-negative.

A log-probability lp is coded by u = -lp in ranges that never overlap, so a shard written
before a range existed still decodes:

- `round(u * 52)` for u <= 20 (at most 1,040);
- `WIDE_BASE + round(u * 52)` for 20 < u <= WIDE_LIMIT (4,096 nats: far beyond -104, where a
  float32 probability is 0, and near enough for float32 to hold the step);
- `FAR_BASE` plus one code per factor (1 + 1/128) of u / WIDE_LIMIT beyond;
- `INF_CODE` for -inf (a masked vocabulary entry).

So every log-probability down to -WIDE_LIMIT is within 1/104 = 0.0096 nats (plus at most 1.2e-4
of float32 rounding), and beyond within u / 255. Codes between 1,040 and WIDE_BASE are the tail
of shards written before code version 2: one code per factor (1 + 1/128) of u / 20.
The token log-probability is a float32 on a grid of 1/64 nats (`round_token_logprobs`): within
1/128 nats, and readable as it is by every client.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa

VERSION = 2  # 1: u > 20 on a logarithmic scale; 2: every u <= WIDE_LIMIT on the 1/52 grid
STEP = 1 / 52  # nats per code: half of it, 0.0096, is under 0.01
FINE_LIMIT = 20.0
FINE_CODES = 1040  # FINE_LIMIT / STEP
WIDE_BASE = 2**20  # beyond any code of version 1 (at most 12,056)
WIDE_LIMIT = 4096.0
FAR_BASE = 2**21  # beyond WIDE_BASE + WIDE_LIMIT / STEP
TAIL_RATIO = 1 + 1 / 128  # beyond a limit each code is a factor of |lp|
INF_CODE = 2**31 - 1
TOKEN_LOGPROB_GRID = 64  # token_logprob is a multiple of 1/64 nats: exact in float32
ID_ORDER_KEY = "logit_extract.topk_id_order"
CODE_TYPE = pa.list_(pa.field("element", pa.int32(), nullable=False))
# Parquet encodings of the compact columns (a list's values are its `.list.element` leaf); the
# float16 entropy stays PLAIN: as small, and DuckDB reads no BYTE_STREAM_SPLIT float16.
COLUMN_ENCODINGS = {
    "position": "BYTE_STREAM_SPLIT",
    "token_id": "BYTE_STREAM_SPLIT",
    "token_logprob": "BYTE_STREAM_SPLIT",
    "token_rank": "BYTE_STREAM_SPLIT",
    "logsumexp": "BYTE_STREAM_SPLIT",
    "topk_id_codes.list.element": "BYTE_STREAM_SPLIT",
    "topk_logprob_deltas.list.element": "BYTE_STREAM_SPLIT",
}


def logprob_codes(logprobs: np.ndarray) -> np.ndarray:
    """int32 codes of log-probabilities (<= 0; a rounding excess above 0 codes as 0)."""
    u = np.maximum(-np.asarray(logprobs, dtype=np.float64), 0.0)
    codes = np.rint(u / STEP)
    beyond = u > FINE_LIMIT  # few entries: the other ranges are worked out on those only
    if beyond.any():
        far = u[beyond]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            tail = FAR_BASE + np.rint(np.log(far / WIDE_LIMIT) / np.log(TAIL_RATIO))
        far_codes = np.where(far <= WIDE_LIMIT, WIDE_BASE + codes[beyond], tail)
        far_codes[np.isinf(far)] = INF_CODE
        codes[beyond] = far_codes
    return codes.astype(np.int32)


def logprobs_from_codes(codes: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of codes (of either version): -inf for INF_CODE."""
    codes = np.asarray(codes, dtype=np.int64)
    u = codes * STEP
    beyond = codes > FINE_CODES  # few entries: the other ranges are worked out on those only
    if beyond.any():
        far = codes[beyond]
        with np.errstate(over="ignore"):
            version_1 = FINE_LIMIT * np.exp((far - FINE_CODES) * np.log(TAIL_RATIO))
            tail = WIDE_LIMIT * np.exp((far - FAR_BASE) * np.log(TAIL_RATIO))
        wide = (far - WIDE_BASE) * STEP
        values = np.where(far < WIDE_BASE, version_1, np.where(far < FAR_BASE, wide, tail))
        values = np.minimum(values, np.finfo(np.float32).max)
        values[far == INF_CODE] = np.inf
        u[beyond] = values
    return (-u).astype(np.float32)


def round_token_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float32 log-probabilities on the 1/64-nat grid (within 1/128 nats; NaN stays NaN)."""
    grid = np.asarray(logprobs, dtype=np.float64) * TOKEN_LOGPROB_GRID
    return (np.rint(grid) / TOKEN_LOGPROB_GRID).astype(np.float32)


def id_order(ids: np.ndarray) -> np.ndarray:
    """A shard's distinct ids by descending frequency class (half powers of two), then by id.

    Classes instead of exact counts keep ids sorted within each class, so the order itself
    stores as small deltas (about a byte an id); the codes cost the same within 0.1%."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel())
    present = np.flatnonzero(counts)
    frequency_class = np.floor(2 * np.log2(counts[present]))
    return present[np.lexsort((present, -frequency_class))].astype(np.int32)


def pack_id_order(order: np.ndarray) -> bytes:
    """The order as footer text, `N:` then base64 of zstd over its N deltas' byte planes
    (int32, little-endian): ASCII, since some readers (Polars) refuse a footer that is not."""
    deltas = np.diff(order.astype(np.int64), prepend=0).astype("<i4")
    planes = deltas.view(np.uint8).reshape(-1, 4).T.tobytes()
    packed = base64.b64encode(pa.Codec("zstd").compress(planes, asbytes=True))
    return b"%d:%s" % (len(order), packed)


def unpack_id_order(text: bytes) -> np.ndarray:
    """The inverse of pack_id_order."""
    size, _, packed = text.partition(b":")
    raw = pa.Codec("zstd").decompress(
        base64.b64decode(packed), decompressed_size=4 * int(size), asbytes=True
    )
    deltas = np.frombuffer(raw, np.uint8).reshape(4, -1).T.copy().view("<i4").ravel()
    return np.cumsum(deltas, dtype=np.int64).astype(np.int32)


def encode(
    ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None
) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(n, k) ids and log-probabilities in descending order, each row's first `counts` kept
    (all k when None): the two list columns and the shard's id order."""
    rows, k = ids.shape
    if counts is None:
        counts = np.full(rows, k, np.int32)
    kept = np.arange(k) < counts[:, None]
    codes = logprob_codes(logprobs)
    deltas = np.diff(codes, axis=1, prepend=0)[kept]
    order = id_order(ids[kept])
    rank = np.zeros(int(order.max()) + 1 if len(order) else 1, np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32))
    id_codes = pa.ListArray.from_arrays(offsets, pa.array(rank[ids[kept]]), type=CODE_TYPE)
    deltas = pa.ListArray.from_arrays(offsets, pa.array(deltas.astype(np.int32)), type=CODE_TYPE)
    return id_codes, deltas, order


def _row_offsets(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column's flat values (int64) and its row offsets, from offset 0."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()[offsets[0] : offsets[-1]].astype(np.int64)
    return values, offsets - offsets[0]


def _entry_codes(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each entry's log-probability code from the flat `topk_logprob_deltas` and row offsets."""
    running = np.concatenate([[0], np.cumsum(values)])
    return running[1:] - np.repeat(running[offsets[:-1]], np.diff(offsets))


def decode(
    id_codes: pa.ChunkedArray | pa.Array | None,
    deltas: pa.ChunkedArray | pa.Array,
    id_order: np.ndarray | None,
    k: int | None = None,
) -> dict[str, np.ndarray]:
    """`topk_logprobs` (n, k; -inf past each row's count), `topk_count` (n,) and, given the
    codes and the shard's id order, `topk_ids` (n, k; -1 past the count) from a shard's compact
    columns. `k` defaults to the longest row."""
    values, offsets = _row_offsets(deltas)
    counts = np.diff(offsets)
    rows = len(counts)
    k = int(counts.max(initial=0)) if k is None else k
    entry_ids = None
    if id_codes is not None and len(values):
        entry_ids = id_order[_row_offsets(id_codes)[0]]
    if rows and k and counts.min() == k:  # every row holds k entries (no top_p): no scatter
        codes = np.cumsum(values.reshape(rows, k), axis=1)
        out = {"topk_logprobs": logprobs_from_codes(codes), "topk_count": counts.astype(np.int32)}
        if id_codes is not None:
            out["topk_ids"] = entry_ids.reshape(rows, k)
        return out
    codes = _entry_codes(values, offsets)
    row = np.repeat(np.arange(rows), counts)
    column = np.arange(len(codes)) - offsets[:-1][row]
    logprobs = np.full((rows, k), -np.inf, np.float32)
    logprobs[row, column] = logprobs_from_codes(codes)
    out = {"topk_logprobs": logprobs, "topk_count": counts.astype(np.int32)}
    if id_codes is not None:
        ids = np.full((rows, k), -1, np.int32)
        if entry_ids is not None:
            ids[row, column] = entry_ids
        out["topk_ids"] = ids
    return out
