"""lib/extract/batching.py: tokenization and truncation counts, requests per task, bucketing, padding."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from lib.extract import batching
from lib.extract.batching import NO_TOKEN, Request
from tests.conftest import AWKWARD

START_ID = 0  # the fixture T5's decoder_start_token_id (its pad id)


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict:
    return {name: AutoTokenizer.from_pretrained(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def sample_texts(texts) -> list[str]:
    """Generated texts of mixed lengths plus the awkward ones (empty, scripts, very long)."""
    return texts[:40] + AWKWARD


def encode(tokenizer, text: str, max_length: int | None = None, **kwargs) -> list[int]:
    """One text alone, the way the issues define the job's inputs."""
    if max_length is None:
        return tokenizer(text, **kwargs)["input_ids"]
    return tokenizer(text, truncation=True, max_length=max_length, **kwargs)["input_ids"]


# -- tokenize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "gpt2", "llama"])
def test_tokenize_equals_tokenizer_call_and_counts_truncations(tokenizers, sample_texts, name):
    tok = tokenizers[name]
    ids, cut = batching.tokenize(tok, sample_texts, max_length=12)
    truncated = len(cut)
    assert ids == [encode(tok, t, 12) for t in sample_texts]
    full_lengths = [len(encode(tok, t)) for t in sample_texts]
    assert truncated == sum(n > 12 for n in full_lengths)
    assert 0 < truncated < len(sample_texts)  # the case mixes cut and uncut texts


def test_tokenize_targets_and_no_special_tokens(tokenizers, sample_texts):
    t5, llama = tokenizers["t5"], tokenizers["llama"]
    ids, cut = batching.tokenize(t5, sample_texts, max_length=10, target=True)
    assert ids == [
        t5(text_target=t, truncation=True, max_length=10)["input_ids"] for t in sample_texts
    ]
    assert len(cut) == sum(len(t5(text_target=t)["input_ids"]) > 10 for t in sample_texts)
    ids, cut = batching.tokenize(llama, sample_texts, max_length=10, add_special_tokens=False)
    assert ids == [encode(llama, t, 10, add_special_tokens=False) for t in sample_texts]
    assert ids[sample_texts.index("")] == []  # "" has no tokens without BOS
    assert len(cut) == sum(
        len(encode(llama, t, add_special_tokens=False)) > 10 for t in sample_texts
    )


@pytest.mark.parametrize("name,special", [("t5", "eos"), ("llama", "bos"), ("gpt2", None)])
def test_text_of_exactly_max_length_is_not_truncated(tokenizers, texts, name, special):
    tok = tokenizers[name]
    text = texts[0] + " " + texts[1]
    full = encode(tok, text)
    if special == "eos":
        assert full[-1] == tok.eos_token_id
    elif special == "bos":
        assert full[0] == tok.bos_token_id
    n = len(full)
    assert n > 4
    # Exactly at the limit: nothing cut. One under: cut, the special token kept either way.
    assert batching.tokenize(tok, [text], max_length=n) == ([full], set())
    ids, cut = batching.tokenize(tok, [text], max_length=n - 1)
    assert cut == {0} and len(ids[0]) == n - 1 and ids[0] == encode(tok, text, n - 1)
    # Mixed in a batch with a short text and one exactly one token longer than the limit.
    longer = text + " " + texts[2]
    ids, cut = batching.tokenize(tok, ["x", text, longer], max_length=n)
    assert cut == {2} and ids[1] == full and len(ids[2]) == n


def test_tokenize_nothing():
    assert batching.tokenize(None, [], max_length=8) == ([], set())


# -- tokenize_unit ----------------------------------------------------------------------------


def unit_table(texts: list, targets: list | None = None) -> pa.Table:
    columns = {
        "id": pa.array([f"r{i}" for i in range(len(texts))]),
        "text": pa.array(texts, pa.string()),
    }
    if targets is not None:
        columns["target"] = pa.array(targets, pa.string())
    return pa.table(columns)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_requests(tokenizers, sample_texts, name):
    tok = tokenizers[name]
    unit = batching.tokenize_unit(unit_table(sample_texts), tok, batching.CAUSAL, "say: ", 16)
    assert unit.skipped == [] and len(unit.requests) == len(sample_texts)
    assert unit.truncated == sum(len(encode(tok, "say: " + t)) > 16 for t in sample_texts)
    for row, (request, text) in enumerate(zip(unit.requests, sample_texts, strict=True)):
        ids = encode(tok, "say: " + text, 16)
        assert (request.row, request.ids, request.decoder_ids, request.first) == (row, ids, None, 0)
        # Position p predicts the token at p + 1; the last position predicts nothing.
        assert request.labels == [
            ids[p + 1] if p + 1 < len(ids) else NO_TOKEN for p in range(len(ids))
        ]
        assert request.scored_length == len(ids)


def test_continuation_requests(tokenizers, sample_texts):
    tok = tokenizers["llama"]
    targets = [t.upper() for t in sample_texts]
    unit = batching.tokenize_unit(
        unit_table(sample_texts, targets), tok, batching.CONTINUATION, "", 12
    )
    empty = sample_texts.index("")
    assert unit.skipped == [(empty, "empty_target")]  # "" has no target tokens (no BOS on targets)
    by_row = {r.row: r for r in unit.requests}
    assert sorted(by_row) == [row for row in range(len(sample_texts)) if row != empty]
    for row, request in by_row.items():
        context = encode(tok, sample_texts[row], 12)
        target = encode(tok, targets[row], 12, add_special_tokens=False)
        assert request.ids == context + target and request.decoder_ids is None
        # The first scored position predicts the first target token.
        assert request.first == len(context) - 1
        assert request.labels == target
        for p in range(request.first, request.first + len(request.labels)):
            assert request.labels[p - request.first] == request.ids[p + 1]


def test_start_requests(tokenizers, sample_texts):
    tok = tokenizers["t5"]
    unit = batching.tokenize_unit(
        unit_table(sample_texts),
        tok,
        batching.START,
        "summarize: ",
        20,
        decoder_start_token_id=START_ID,
    )
    assert unit.skipped == [] and [r.row for r in unit.requests] == list(range(len(sample_texts)))
    for request, text in zip(unit.requests, sample_texts, strict=True):
        assert request.ids == encode(tok, "summarize: " + text, 20)
        assert (request.decoder_ids, request.first, request.labels) == ([START_ID], 0, [NO_TOKEN])
        assert request.scored_length == 1


def test_targets_requests(tokenizers, sample_texts):
    tok = tokenizers["t5"]
    targets = sample_texts[::-1]
    unit = batching.tokenize_unit(
        unit_table(sample_texts, targets),
        tok,
        batching.TARGETS,
        "",
        9,
        decoder_start_token_id=START_ID,
    )
    assert unit.skipped == []  # T5 targets always hold EOS, even for ""
    want_truncated = sum(
        len(encode(tok, s)) > 9 or len(tok(text_target=t)["input_ids"]) > 9
        for s, t in zip(sample_texts, targets, strict=True)
    )
    assert unit.truncated == want_truncated
    for request, text, target in zip(unit.requests, sample_texts, targets, strict=True):
        tgt = tok(text_target=target, truncation=True, max_length=9)["input_ids"]
        assert request.ids == encode(tok, text, 9)
        assert request.decoder_ids == [START_ID] + tgt[:-1]
        assert (request.first, request.labels) == (0, tgt)
        assert request.scored_length == len(tgt)


def test_generate_requests(tokenizers, sample_texts):
    tok = tokenizers["t5"]
    unit = batching.tokenize_unit(
        unit_table(sample_texts, [None] * len(sample_texts)),
        tok,
        batching.GENERATE,
        "",
        20,
        decoder_start_token_id=START_ID,
    )
    assert unit.skipped == []  # targets are not used, so null targets do not matter
    for request, text in zip(unit.requests, sample_texts, strict=True):
        assert (request.ids, request.decoder_ids, request.first, request.labels) == (
            encode(tok, text, 20),
            None,
            0,
            [],
        )


@pytest.mark.parametrize(
    "name,task,want",
    [
        # rows: ok, null text, null target, empty text, empty target, null text and target
        ("gpt2", batching.CAUSAL, [(1, "null_text"), (3, "empty_text"), (5, "null_text")]),
        (
            "gpt2",
            batching.CONTINUATION,
            [
                (1, "null_text"),
                (2, "null_target"),
                (3, "empty_text"),
                (4, "empty_target"),
                (5, "null_text"),
            ],
        ),
        (
            "llama",
            batching.CONTINUATION,  # "" still gets BOS as text, but a target has no special tokens
            [(1, "null_text"), (2, "null_target"), (4, "empty_target"), (5, "null_text")],
        ),
        ("t5", batching.TARGETS, [(1, "null_text"), (2, "null_target"), (5, "null_text")]),
        ("t5", batching.START, [(1, "null_text"), (5, "null_text")]),
    ],
)
def test_skip_reasons(tokenizers, name, task, want):
    texts = ["Kala mon.", None, "Kala mon.", "", "Kala mon.", None]
    targets = ["Pou ti.", "Pou ti.", None, "Pou ti.", "", None]
    unit = batching.tokenize_unit(
        unit_table(texts, targets), tokenizers[name], task, "", 32, decoder_start_token_id=START_ID
    )
    assert unit.skipped == want
    scored = [r.row for r in unit.requests]
    # Each row once: scored or skipped.
    assert sorted(scored + [row for row, _ in unit.skipped]) == list(range(len(texts)))


# -- make_batches -----------------------------------------------------------------------------


def random_requests(kind: str, count: int = 300, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    lengths = [max(1, int(rng.lognormvariate(3, 0.8))) for _ in range(count)]
    requests = []
    for row, n in enumerate(lengths):
        ids = [rng.randrange(5, 100) for _ in range(n)]
        if kind == "causal":
            requests.append(Request(row, ids, None, 0, ids[1:] + [NO_TOKEN]))
        elif kind == "targets":
            tgt = [rng.randrange(5, 100) for _ in range(max(1, int(rng.lognormvariate(2, 0.8))))]
            requests.append(Request(row, ids, [START_ID] + tgt[:-1], 0, tgt))
        else:  # generate
            requests.append(Request(row, ids))
    return requests


def padded_cost(batch: list[Request], decoder_length: int, multiple: int = 8) -> int:
    """Tokens of the tensors `collate` really builds, plus the decode steps in generate mode."""
    padded = batching.collate(batch, pad_id=0, multiple=multiple)
    return padded.padded_tokens + len(batch) * decoder_length


@pytest.mark.parametrize(
    "kind,max_tokens,decoder_length,multiple",
    [
        ("causal", 512, 0, 8),
        ("causal", 40, 0, 8),
        ("targets", 700, 0, 8),
        ("generate", 600, 16, 8),
        ("causal", 512, 0, 1),
        ("targets", 700, 0, 1),
    ],
)
def test_make_batches(kind, max_tokens, decoder_length, multiple):
    requests = random_requests(kind)
    batches = batching.make_batches(requests, max_tokens, decoder_length, multiple=multiple)
    flat = [r for batch in batches for r in batch]
    assert sorted(r.row for r in flat) == list(range(len(requests)))  # every request exactly once
    # The requests themselves, not copies.
    assert all(any(r is q for q in requests) for r in flat[:5])
    for i, batch in enumerate(batches):
        cost = padded_cost(batch, decoder_length, multiple)
        assert cost <= max_tokens or len(batch) == 1, (i, cost)
    # Never worse than filling each batch greedily, on the objective the cut minimises.
    overhead = max_tokens / 32
    greedy, current = [], []
    for request in flat:
        if current and padded_cost(current + [request], decoder_length, multiple) > max_tokens:
            greedy.append(current)
            current = []
        current.append(request)
    greedy.append(current)
    ours = sum(padded_cost(b, decoder_length, multiple) + overhead for b in batches)
    assert ours <= sum(padded_cost(b, decoder_length, multiple) + overhead for b in greedy)
    # Longest first: the length that sets the padding never grows along the batches.
    key = [max(len(r.ids), len(r.decoder_ids or ())) for r in flat]
    assert key == sorted(key, reverse=True)
    assert len(flat[0].ids) == max(len(r.ids) for r in requests) or kind == "targets"
    # Deterministic: the same batches whatever order the requests came in.
    shuffled = requests[:]
    random.Random(1).shuffle(shuffled)
    again = batching.make_batches(shuffled, max_tokens, decoder_length, multiple=multiple)
    assert [[r.row for r in b] for b in again] == [[r.row for r in b] for b in batches]


def test_row_over_budget_gets_a_batch_of_its_own():
    requests = [
        Request(0, [1] * 30, None, 0, []),
        Request(1, [1] * 100, None, 0, []),
        Request(2, [1] * 20, None, 0, []),
    ]
    batches = batching.make_batches(requests, max_tokens=64, decoder_length=0, batch_cost=100)
    assert [[r.row for r in b] for b in batches] == [[1], [0, 2]]


@pytest.mark.parametrize("seq2seq", [False, True], ids=["one-sequence", "encoder-decoder"])
def test_make_batches_is_optimal_on_small_inputs(seq2seq):
    """Brute force over every cut of the sorted rows: the dynamic program finds the cheapest.

    Encoder-decoder rows with unrelated decoder lengths take the program's running-maxima path.
    """
    rng = random.Random(5)
    choices = [1, 3, 9, 17, 30, 33, 60]
    for trial in range(30):
        lengths = [rng.choice(choices) for _ in range(rng.randint(1, 8))]
        requests = [
            Request(i, [1] * n, [0] * rng.choice(choices) if seq2seq else None, 0, [])
            for i, n in enumerate(lengths)
        ]
        budget, overhead = rng.choice([64, 128, 256]), rng.choice([0, 8, 40])
        batches = batching.make_batches(requests, budget, batch_cost=overhead)
        flat = [r for b in batches for r in b]

        def cost(batch, overhead=overhead):
            width = batching.round_up(max(len(r.ids) for r in batch))
            if seq2seq:
                width += batching.round_up(max(len(r.decoder_ids) for r in batch))
            return len(batch) * width + overhead

        def feasible(batch, overhead=overhead, budget=budget):
            return len(batch) == 1 or cost(batch) - overhead <= budget

        best = min(
            sum(cost(flat[a:b]) for a, b in zip((0, *cuts), (*cuts, len(flat)), strict=True))
            for mask in range(2 ** (len(flat) - 1))
            for cuts in [tuple(i + 1 for i in range(len(flat) - 1) if mask >> i & 1)]
            if all(feasible(flat[a:b]) for a, b in zip((0, *cuts), (*cuts, len(flat)), strict=True))
        )
        assert all(feasible(b) for b in batches), trial
        assert sum(cost(b) for b in batches) == best, (trial, lengths, budget, overhead)


# -- collate ----------------------------------------------------------------------------------


def check_padding(ids, mask, sequences: list[list[int]], pad_id: int) -> None:
    width = ids.shape[1]
    assert ids.shape == mask.shape == (len(sequences), width)
    assert width == max(len(s) for s in sequences) if width == 1 else width % 8 == 0
    assert width < max(len(s) for s in sequences) + 8
    for i, seq in enumerate(sequences):
        assert ids[i, : len(seq)].tolist() == seq  # right padding: the text starts at column 0
        assert (ids[i, len(seq) :] == pad_id).all()
        assert mask[i].tolist() == [1] * len(seq) + [0] * (width - len(seq))


def check_selection(batch: batching.Batch) -> None:
    """`select`, `labels`, `row`, `position` rebuilt from the requests, one position at a time."""
    scored = batch.decoder_input_ids if batch.decoder_input_ids is not None else batch.input_ids
    scored_mask = (
        batch.decoder_attention_mask
        if batch.decoder_attention_mask is not None
        else batch.attention_mask
    )
    width = scored.shape[1]
    want = []
    for b, request in enumerate(batch.requests):
        for offset, label in enumerate(request.labels):
            p = request.first + offset
            want.append((b * width + p, label, request.row, p))
    got = list(
        zip(
            batch.select.tolist(),
            batch.labels.tolist(),
            batch.row.tolist(),
            batch.position.tolist(),
            strict=True,
        )
    )
    assert got == want
    # Every selected position is a real (unpadded) token of the scored sequence.
    assert scored_mask.flatten()[batch.select].all()
    assert batch.row.dtype == np.int32 and batch.position.dtype == np.int32


def test_collate_causal_padding_and_selection(tokenizers, sample_texts):
    tok = tokenizers["llama"]
    unit = batching.tokenize_unit(unit_table(sample_texts[:9]), tok, batching.CAUSAL, "", 23)
    batch = batching.collate(unit.requests, pad_id=7)
    sequences = [r.ids for r in unit.requests]
    check_padding(batch.input_ids, batch.attention_mask, sequences, pad_id=7)
    assert batch.input_ids.shape[1] == 24  # longest is 23 tokens, truncated
    assert batch.decoder_input_ids is None and batch.decoder_attention_mask is None
    check_selection(batch)
    # The label of a selected position is the next real token of the padded row, -1 at the end.
    flat = batch.input_ids.flatten()
    ends = {b * 24 + len(s) - 1 for b, s in enumerate(sequences)}
    for index, label in zip(batch.select.tolist(), batch.labels.tolist(), strict=True):
        assert label == (NO_TOKEN if index in ends else flat[index + 1].item())
    assert batch.real_tokens == sum(map(len, sequences)) == batch.labels.numel()
    assert batch.padded_tokens == 9 * 24


def test_collate_continuation_selects_only_target_positions(tokenizers, sample_texts):
    tok = tokenizers["gpt2"]
    unit = batching.tokenize_unit(
        unit_table(sample_texts[:6], sample_texts[10:16]), tok, batching.CONTINUATION, "", 16
    )
    batch = batching.collate(unit.requests, pad_id=0)
    check_padding(batch.input_ids, batch.attention_mask, [r.ids for r in unit.requests], pad_id=0)
    check_selection(batch)
    flat = batch.input_ids.flatten()
    assert batch.labels.tolist() == flat[batch.select + 1].tolist()  # each predicts the next token
    assert batch.labels.numel() == sum(len(r.labels) for r in unit.requests)
    assert min(batch.position.tolist()) > 0


def test_collate_targets(tokenizers, sample_texts):
    tok = tokenizers["t5"]
    unit = batching.tokenize_unit(
        unit_table(sample_texts[:11], sample_texts[20:31]),
        tok,
        batching.TARGETS,
        "",
        30,
        decoder_start_token_id=START_ID,
    )
    batch = batching.collate(unit.requests, pad_id=0)
    check_padding(batch.input_ids, batch.attention_mask, [r.ids for r in unit.requests], pad_id=0)
    check_padding(
        batch.decoder_input_ids,
        batch.decoder_attention_mask,
        [r.decoder_ids for r in unit.requests],
        0,
    )
    check_selection(batch)
    # Teacher forcing: the decoder input one step later is the label.
    flat = batch.decoder_input_ids.flatten()
    width = batch.decoder_input_ids.shape[1]
    for index, label in zip(batch.select.tolist(), batch.labels.tolist(), strict=True):
        if (index + 1) % width and batch.decoder_attention_mask.flatten()[index + 1]:
            assert flat[index + 1].item() == label
    lengths = sum(len(r.ids) + len(r.decoder_ids) for r in unit.requests)
    assert batch.real_tokens == lengths
    assert batch.padded_tokens == batch.input_ids.numel() + batch.decoder_input_ids.numel()


def test_collate_start_keeps_a_single_decoder_step(tokenizers, sample_texts):
    tok = tokenizers["t5"]
    unit = batching.tokenize_unit(
        unit_table(sample_texts[:5]), tok, batching.START, "", 30, decoder_start_token_id=START_ID
    )
    batch = batching.collate(unit.requests, pad_id=0)
    assert (
        batch.decoder_input_ids.tolist() == [[START_ID]] * 5
        and batch.decoder_attention_mask.tolist() == [[1]] * 5
    )
    assert batch.input_ids.shape[1] % 8 == 0
    check_selection(batch)
    assert batch.select.tolist() == [0, 1, 2, 3, 4] and batch.labels.tolist() == [NO_TOKEN] * 5


@pytest.mark.parametrize("longest,width", [(8, 8), (9, 16), (16, 16), (17, 24)])
def test_collate_width_is_a_multiple_of_8(longest, width):
    requests = [
        Request(3, list(range(1, longest + 1)), None, 0, [0] * longest),
        Request(1, [5, 6], None, 0, [0, 0]),
    ]
    batch = batching.collate(requests, pad_id=99)
    assert batch.input_ids.shape == (2, width)
    check_padding(batch.input_ids, batch.attention_mask, [r.ids for r in requests], pad_id=99)
    assert batch.row.tolist() == [3] * longest + [1, 1]


def test_batches_cover_every_scored_position(tokenizers, sample_texts):
    """Bucketing then collating loses no (row, position, label) of the requests."""
    tok = tokenizers["gpt2"]
    unit = batching.tokenize_unit(unit_table(sample_texts), tok, batching.CAUSAL, "", 20)
    want = {(r.row, r.first + i, label) for r in unit.requests for i, label in enumerate(r.labels)}
    got = []
    for requests in batching.make_batches(unit.requests, max_tokens=64):
        batch = batching.collate(requests, pad_id=0)
        check_selection(batch)
        got += zip(batch.row.tolist(), batch.position.tolist(), batch.labels.tolist(), strict=True)
    assert len(got) == len(want) and set(got) == want


def test_collate_generate_has_no_scored_positions_yet():
    """Generate mode scores decoded steps later: the batch is only the padded encoder input."""
    batch = batching.collate([Request(4, [1, 2, 3]), Request(9, [5])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.decoder_input_ids is None
    assert (
        batch.select.numel() == batch.labels.numel() == len(batch.row) == len(batch.position) == 0
    )
    assert (batch.real_tokens, batch.padded_tokens) == (4, 16)
    # as on a CPU: padded to the longest row only
    batch = batching.collate([Request(4, [1, 2, 3]), Request(9, [5])], pad_id=0, multiple=1)
    assert batch.input_ids.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert (batch.real_tokens, batch.padded_tokens) == (4, 6)
    assert batching.pad_multiple_for(torch.device("cpu")) == 1
    assert batching.pad_multiple_for(torch.device("cuda")) == 8


@pytest.mark.parametrize("task", [batching.CAUSAL, batching.TARGETS, batching.START])
def test_empty_unit(tokenizers, task):
    tok = tokenizers["t5" if task != batching.CAUSAL else "gpt2"]
    unit = batching.tokenize_unit(
        unit_table([], []), tok, task, "p: ", 8, decoder_start_token_id=START_ID
    )
    assert (unit.requests, unit.skipped, unit.truncated) == ([], [], 0)
    assert batching.make_batches(unit.requests, max_tokens=64) == []
