"""Tokenize a unit's rows, bucket them by length under a token budget, and pad them into batches.

A `Request` is one input row ready for the model. Its *scored sequence* is the one whose
positions become output rows: the whole sequence for a causal model, the decoder input for a
seq2seq model. `first` is the first scored position and `labels` the tokens each scored position
predicts (-1 where there is none), so row p of the output predicts `labels[p - first]`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from lib.extract import chat as chat_tokens

# Padded widths are multiples of 8 on an accelerator (tensor cores); a CPU gains nothing from
# them, and rows of 5 tokens padded to 8 cost a third more compute (the tiny-rows bench case).
PAD_MULTIPLE = 8
CPU_PAD_MULTIPLE = 1
# batching.max_tokens when the config leaves it null. On a CPU, batches of 4,096 padded tokens
# ran 5-8% faster than 16,384 (T5 start and GPT-2, d_model 256, log-normal rows, 2 cores: the
# layers' activations stay in cache); an accelerator wants large batches.
CPU_MAX_TOKENS = 4096
ACCELERATOR_MAX_TOKENS = 16384
NO_TOKEN = -1

# What the job computes for each input row; chosen from the model family and the config.
CAUSAL = "causal"  # every position of prefix + text
CONTINUATION = "continuation"  # causal model, only the positions that predict the target
START = "start"  # seq2seq, one decoder step from the start token
TARGETS = "targets"  # seq2seq, teacher-forced on the target
GENERATE = "generate"  # seq2seq, greedy decoding


@dataclass
class Request:
    row: int
    ids: list[int]
    decoder_ids: list[int] | None = None
    first: int = 0
    labels: list[int] = field(default_factory=list)
    offset: int = 0  # added to the output positions: a window's place in its document
    positions: list[int] | None = None  # the scored positions, when not first.. (chat roles)

    @property
    def scored_length(self) -> int:
        return len(self.ids) if self.decoder_ids is None else len(self.decoder_ids)


@dataclass
class TokenizedUnit:
    requests: list[Request]
    skipped: list[tuple[int, str]]  # (row in unit, reason)
    text_lengths: list[int] = field(default_factory=list)  # tokens of each scored row's text
    target_lengths: list[int] | None = None  # and of its target, where one is tokenized
    truncated_rows: list[int] = field(default_factory=list)  # the scored rows that were cut
    n_bytes: np.ndarray | None = None  # per row: UTF-8 bytes of its scored text (conversations)

    @property
    def truncated(self) -> int:
        """Scored rows whose text or target was cut (a row counts once)."""
        return len(self.truncated_rows)


@dataclass
class Batch:
    """Padded tensors for one forward pass, plus where each scored position goes."""

    requests: list[Request]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor | None
    decoder_attention_mask: torch.Tensor | None
    select: torch.Tensor  # (N,) flat indices into the (B * T) scored positions
    labels: torch.Tensor  # (N,) token each selected position predicts, -1 for none
    row: np.ndarray  # (N,) row in the unit
    position: np.ndarray  # (N,) position in the scored sequence
    real_tokens: int
    padded_tokens: int

    def _map_tensors(self, fn) -> Batch:
        names = (
            "input_ids",
            "attention_mask",
            "decoder_input_ids",
            "decoder_attention_mask",
            "select",
            "labels",
        )
        moved = {name: fn(getattr(self, name)) for name in names if getattr(self, name) is not None}
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> Batch:
        """Page-locked copy, so that host-to-device copies can run asynchronously."""
        return self._map_tensors(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """The tensors on `device` (asynchronous from pinned memory); numpy indices stay on the host."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=True))


def max_tokens_for(configured: int | None, device: torch.device) -> int:
    """The batch budget: batching.max_tokens, or the device's default when it is null."""
    if configured is not None:
        return configured
    return CPU_MAX_TOKENS if device.type == "cpu" else ACCELERATOR_MAX_TOKENS


def pad_multiple_for(device: torch.device) -> int:
    """What padded widths are a multiple of on `device`."""
    return CPU_PAD_MULTIPLE if device.type == "cpu" else PAD_MULTIPLE


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """Padded width: a multiple of `multiple`; a width of 1 (a single decoder step) stays 1."""
    return n if n <= 1 else -(-n // multiple) * multiple


def tokenize(
    tokenizer, texts: list[str], max_length: int, target: bool = False, **kwargs
) -> tuple[list[list[int]], set[int]]:
    """`tokenizer(texts, truncation=True, max_length=...)` ids (`text_target=` for targets),
    and the indices of the texts that were truncated."""
    if not texts:
        return [], set()

    def encode(batch: list[str], limit: int) -> list[list[int]]:
        text = {"text_target": batch} if target else {"text": batch}
        return tokenizer(
            **text,
            truncation=True,
            max_length=limit,
            return_attention_mask=False,
            return_token_type_ids=False,
            **kwargs,
        )["input_ids"]

    ids = encode(texts, max_length)
    # Only a sequence that hit the limit can have been cut; re-check just those one token longer.
    full = [i for i, seq in enumerate(ids) if len(seq) >= max_length]
    longer = encode([texts[i] for i in full], max_length + 1) if full else []
    return ids, {i for i, seq in zip(full, longer, strict=True) if len(seq) > max_length}


def window_requests(
    row: int, tokens: list[int], start_token: int, max_length: int, context: int
) -> list[Request]:
    """Score every token of a long text once, in windows of at most `max_length` positions.

    The sequence is `[start_token] + tokens` (position p predicts tokens[p]). The first window
    holds its first `max_length` positions; each later one predicts the next
    `max_length - context + 1` tokens after `context` tokens of context that it does not
    score again, ending on its last predicted token. This is lm-evaluation-harness's rolling
    rule (`get_rolling_token_windows`), which with context=1 is its `loglikelihood_rolling`.
    """
    sequence = [start_token, *tokens]
    end = min(max_length, len(tokens))
    windows = [Request(row, sequence[:end], None, 0, tokens[:end])]
    step = max_length - context + 1
    while end < len(tokens):
        stop = min(len(tokens), end + step)
        begin = max(0, stop - max_length)
        ids = sequence[begin:stop]
        windows.append(Request(row, ids, None, end - begin, tokens[end:stop], offset=begin))
        end = stop
    return windows


def _windows_unit(
    texts: list, tokenizer, prefix: str, max_length: int, context: int
) -> TokenizedUnit:
    """tokenize_unit for `input.long_documents=windows` (causal models): nothing is cut."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    skipped = [(row, "null_text") for row, text in enumerate(texts) if text is None]
    rows = [row for row, text in enumerate(texts) if text is not None]
    ids = (
        tokenizer(
            [prefix + texts[r] for r in rows],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        if rows
        else []
    )
    requests, lengths = [], []
    for row, tokens in zip(rows, ids, strict=True):
        if not tokens:
            skipped.append((row, "empty_text"))
            continue
        requests += window_requests(row, tokens, start, max_length, context)
        lengths.append(len(tokens))
    return TokenizedUnit(requests, sorted(skipped), lengths)


def _chat_unit(values: list, tokenizer, chat: ChatInput, max_length: int) -> TokenizedUnit:
    """tokenize_unit for conversations (causal models): one request per templated row, scoring
    every position or, with roles, those that predict a token of those roles' messages."""
    requests, skipped, lengths, truncated = [], [], [], []
    n_bytes = np.zeros(len(values), dtype=np.int64)
    found = chat_tokens.tokenize(values, tokenizer, chat.template, chat.roles, max_length)
    for row, item in enumerate(found):
        if isinstance(item, str):
            skipped.append((row, item))
            continue
        seq = item.ids
        if not seq:
            skipped.append((row, "empty_messages"))
            continue
        if item.scored is None:
            request = Request(row, seq, None, 0, seq[1:] + [NO_TOKEN])
        else:
            # Position p predicts token p + 1: the rows are the positions before scored tokens.
            positions = [t - 1 for t in item.scored if t >= 1]
            if not positions:
                skipped.append((row, "no_scored_role"))
                continue
            request = Request(row, seq, None, 0, [seq[p + 1] for p in positions], 0, positions)
        requests.append(request)
        lengths.append(len(seq))
        n_bytes[row] = item.n_bytes
        if item.truncated:
            truncated.append(row)
    return TokenizedUnit(requests, skipped, lengths, None, truncated, n_bytes)


@dataclass(frozen=True)
class ChatInput:
    """How conversations are tokenized: the template (None: the tokenizer's) and the roles scored
    (None: every position)."""

    template: str | None
    roles: list[str] | None


def _requests(
    task: str,
    rows: list[int],
    ids: list[list[int]],
    target_ids: list[list[int]],
    decoder_start: int | None,
    skipped: list[tuple[int, str]],
) -> tuple[list[Request], list[int]]:
    """One request per scorable row (empty texts and targets go to `skipped`), and the indices
    into `rows` of the rows scored."""
    requests = []
    scored_index = []
    for i, row in enumerate(rows):
        seq = ids[i]
        if not seq:
            skipped.append((row, "empty_text"))
            continue
        if task == CAUSAL:
            requests.append(Request(row, seq, None, 0, seq[1:] + [NO_TOKEN]))
        elif task == START:
            requests.append(Request(row, seq, [decoder_start], 0, [NO_TOKEN]))
        elif task == GENERATE:
            requests.append(Request(row, seq))
        elif not target_ids[i]:
            skipped.append((row, "empty_target"))
            continue
        elif task == TARGETS:
            tgt = target_ids[i]
            requests.append(Request(row, seq, [decoder_start] + tgt[:-1], 0, tgt))
        else:  # CONTINUATION
            tgt = target_ids[i]
            requests.append(Request(row, seq + tgt, None, len(seq) - 1, tgt))
        scored_index.append(i)
    return requests, scored_index


def tokenize_unit(
    table: pa.Table,
    tokenizer,
    task: str,
    prefix: str,
    max_length: int,
    decoder_start_token_id: int | None = None,
    *,
    window_context: int | None = None,
    chat: ChatInput | None = None,
) -> TokenizedUnit:
    """Turn a unit's `text` (and `target`) columns into requests; unscorable rows are skipped.
    With `window_context` (causal task only) long texts are scored whole, in windows; with
    `chat`, its `messages` column is (causal task only)."""
    if chat is not None:
        return _chat_unit(table.column("messages").to_pylist(), tokenizer, chat, max_length)
    texts = table.column("text").to_pylist()
    if window_context is not None:
        return _windows_unit(texts, tokenizer, prefix, max_length, window_context)
    targets = table.column("target").to_pylist() if "target" in table.column_names else None
    uses_targets = task in (CONTINUATION, TARGETS)
    skipped: list[tuple[int, str]] = []
    rows = []
    for row, text in enumerate(texts):
        if text is None:
            skipped.append((row, "null_text"))
        elif uses_targets and targets[row] is None:
            skipped.append((row, "null_target"))
        else:
            rows.append(row)
    ids, cut = tokenize(tokenizer, [prefix + texts[r] for r in rows], max_length)
    target_ids: list[list[int]] = []
    if task == TARGETS:
        target_ids, target_cut = tokenize(
            tokenizer, [targets[r] for r in rows], max_length, target=True
        )
        cut |= target_cut
    elif task == CONTINUATION:
        target_ids, target_cut = tokenize(
            tokenizer, [targets[r] for r in rows], max_length, add_special_tokens=False
        )
        cut |= target_cut

    requests, scored_index = _requests(task, rows, ids, target_ids, decoder_start_token_id, skipped)
    skipped.sort()
    # A row counts once however many of its sequences were cut, and only if it is scored.
    scored = {request.row for request in requests}
    truncated_rows = sorted(rows[i] for i in cut if rows[i] in scored)
    return TokenizedUnit(
        requests,
        skipped,
        [len(ids[i]) for i in scored_index],
        [len(target_ids[i]) for i in scored_index] if uses_targets else None,
        truncated_rows,
    )


def length_histogram(lengths: list[int], max_length: int, bins: int = 64) -> dict:
    """Counts of token lengths in equal-width bins from 0 to `max_length` (inclusive, in the last
    bin), for unit records: small whatever the unit's size, and summable across units."""
    width = max(1, -(-max_length // bins))
    counts = np.bincount(
        np.minimum(np.asarray(lengths, dtype=np.int64) // width, max_length // width),
        minlength=max_length // width + 1,
    )
    return {"bin_width": width, "counts": counts.tolist()}


def _padded_width(lengths: np.ndarray, multiple: int) -> np.ndarray:
    """`round_up` over an array."""
    return np.where(lengths <= 1, lengths, -(-lengths // multiple) * multiple)


def make_batches(
    requests: list[Request],
    max_tokens: int,
    decoder_length: int = 0,
    batch_cost: float | None = None,
    multiple: int = PAD_MULTIPLE,
) -> list[list[Request]]:
    """Split requests into batches of at most `max_tokens` padded tokens with little padding.

    Rows are sorted longest first (an OOM shows at once), then cut into consecutive batches by
    dynamic programming that minimises padded tokens plus `batch_cost` tokens per batch (default
    max_tokens / 32, which stands for a batch's fixed overhead). Filling each batch greedily
    instead wastes a quarter of the compute on a log-normal length mix when a unit holds only a
    few batches' worth of rows (measured: 75% real tokens greedy, 93% with this cut).
    A seq2seq batch counts encoder plus decoder positions; `decoder_length` is the fixed decoder
    budget per row in generate mode (0 otherwise). A row over the budget gets a batch of one.
    """
    # Seq2seq rows pad two lengths; ordering by the longer one packs both best when they are
    # unrelated (measured: 61% real tokens against 33% ordering by encoder length alone).
    ordered = sorted(
        requests,
        key=lambda r: (max(len(r.ids), len(r.decoder_ids or ())), len(r.ids), -r.row),
        reverse=True,
    )
    n = len(ordered)
    if n == 0:
        return []
    overhead = max_tokens / 32 if batch_cost is None else batch_cost
    enc = np.array([len(r.ids) for r in ordered], dtype=np.int64)
    dec = np.array([decoder_length or len(r.decoder_ids or ()) for r in ordered], dtype=np.int64)
    own = _padded_width(enc, multiple) + _padded_width(dec, multiple)
    # Sorted this way, most tasks' rows are non-increasing in both lengths, and then the widest
    # row of ordered[j:i] is ordered[j]; only seq2seq targets need running maxima.
    monotone = bool((np.diff(enc) <= 0).all() and (np.diff(dec) <= 0).all())
    rows_from = np.arange(n, 0, -1)  # rows_from[-w:] = w, ..., 1: rows in ordered[i - w:i]
    best = np.zeros(n + 1)  # best[i]: least cost of batching ordered[:i]
    cut = np.zeros(n + 1, dtype=np.int64)  # the last batch of that solution starts here
    for i in range(1, n + 1):
        # A batch ordered[j:i] is at least as wide as its last row, which bounds how far back j goes.
        first = i - max(1, min(i, max_tokens // max(1, int(own[i - 1]))))
        if monotone:
            widest = own[first:i]
        else:
            widest = _padded_width(np.maximum.accumulate(enc[first:i][::-1])[::-1], multiple)
            widest += _padded_width(np.maximum.accumulate(dec[first:i][::-1])[::-1], multiple)
        padded = rows_from[n - (i - first) :] * widest
        total = best[first:i] + padded + overhead
        total[padded > max_tokens] = np.inf
        total[-1] = best[i - 1] + padded[-1] + overhead  # a single row always fits
        pick = int(np.argmin(total))
        best[i], cut[i] = total[pick], first + pick
    bounds = []
    i = n
    while i > 0:
        bounds.append((int(cut[i]), i))
        i = int(cut[i])
    return [ordered[a:b] for a, b in reversed(bounds)]


def _pad(
    sequences: list[list[int]], pad_id: int, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    width = round_up(int(lengths.max()), multiple)
    mask = np.arange(width) < lengths[:, None]
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    # Row-major boolean assignment fills each row's first `length` slots in order.
    ids[mask] = np.fromiter(
        itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())
    )
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def collate(requests: list[Request], pad_id: int, multiple: int = PAD_MULTIPLE) -> Batch:
    """Right-pad a batch to a multiple of `multiple` and index the positions that become output
    rows."""
    input_ids, attention_mask = _pad([r.ids for r in requests], pad_id, multiple)
    decoder_input_ids = decoder_attention_mask = None
    if requests[0].decoder_ids is not None:
        decoder_input_ids, decoder_attention_mask = _pad(
            [r.decoder_ids for r in requests], pad_id, multiple
        )
    width = (decoder_input_ids if decoder_input_ids is not None else input_ids).shape[1]

    counts = np.array([len(r.labels) for r in requests], dtype=np.int64)
    firsts = np.array([r.first for r in requests], dtype=np.int64)
    offsets = np.array([r.offset for r in requests], dtype=np.int64)
    batch_row = np.repeat(np.arange(len(requests)), counts)
    if any(r.positions is not None for r in requests):
        position = np.concatenate(
            [
                np.asarray(r.positions, dtype=np.int64)
                if r.positions is not None
                else r.first + np.arange(len(r.labels), dtype=np.int64)
                for r in requests
            ]
        )
    else:
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        position = np.repeat(firsts, counts) + np.arange(counts.sum()) - starts  # in the window
    labels = np.fromiter(
        itertools.chain.from_iterable(r.labels for r in requests),
        dtype=np.int64,
        count=int(counts.sum()),
    )
    rows = np.array([r.row for r in requests], dtype=np.int64)
    real = int(attention_mask.sum()) + (
        int(decoder_attention_mask.sum()) if decoder_attention_mask is not None else 0
    )
    padded = input_ids.numel() + (decoder_input_ids.numel() if decoder_input_ids is not None else 0)
    return Batch(
        requests=requests,
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
        select=torch.from_numpy(batch_row * width + position),
        labels=torch.from_numpy(labels),
        row=rows[batch_row].astype(np.int32),
        position=(position + np.repeat(offsets, counts)).astype(np.int32),
        real_tokens=real,
        padded_tokens=padded,
    )
