"""The benchmark's models and corpora: presets, length-mix cases, tokenizers trained once."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib import sample


@dataclass
class ModelSpec:
    name: str
    family: str  # t5, gpt2 or llama
    d_model: int
    layers: int
    vocab: int
    mode: str  # start (T5) or causal
    tokenizer_vocab: int = 2000


PRESETS = {
    "cpu": [
        ModelSpec("t5-d256", "t5", 256, 4, 32128, "start"),
        ModelSpec("gpt2-d256", "gpt2", 256, 4, 32000, "causal"),
    ],
    "gpu": [
        ModelSpec("t5-base-shape", "t5", 768, 12, 32128, "start"),
        ModelSpec("llama-1b-shape", "llama", 2048, 16, 32000, "causal"),
    ],
}


TINY = {
    "t5": ModelSpec("t5-tiny", "t5", 64, 2, 32128, "start"),
    "gpt2": ModelSpec("gpt2-tiny", "gpt2", 64, 2, 32000, "causal"),
    "llama": ModelSpec("llama-tiny", "llama", 64, 2, 32000, "causal"),
}


# --quick's models: the tiny shapes with output vocabularies of 2,048 (a smoke run measures
# nothing, and 32k-entry heads were most of its time).
QUICK = {name: replace(spec, vocab=2048) for name, spec in TINY.items()}


# The nearly free model of the host ceiling: the job's own work decides its speed.
CEILING = ModelSpec("gpt2-d8", "gpt2", 8, 1, 600, "causal", tokenizer_vocab=600)


SEED = 123  # one seed for every corpus: the words (and so the tokenizers' fit) are the same


@dataclass(frozen=True)
class Case:
    about: str
    # Rows per row of the log-normal case, so that every case's N rows hold about as many
    # tokens (a log-normal row has ~71 tokens, a heavy-tail one ~150, a tiny one ~5).
    rows_factor: float


CASES = {
    "narrow": Case("word counts log-normal, sigma 0.1 around 40", 1.5),
    "lognormal": Case("word counts log-normal, sigma 0.9 around 40", 1.0),
    "heavy-tail": Case("75% short rows (sigma 0.6 around 20 words), 25% cut at max_length", 0.5),
    "tiny": Case("1-4 words a row", 15.0),
}


def case_texts(case: str, rows: int) -> list[str]:
    """The first `rows` texts of one corpus case (a longer call returns the same prefix)."""
    if case == "narrow":
        return sample.generate_texts(rows, SEED, mean_words=40, sigma=0.1)
    if case == "lognormal":
        return sample.generate_texts(rows, SEED, mean_words=40, sigma=0.9)
    if case == "heavy-tail":
        # ~700 words are 800+ tokens with these tokenizers: a long row is always cut at 512.
        long_rows = np.random.default_rng(SEED).random(rows) < 0.25
        short = iter(sample.generate_texts(rows, SEED, mean_words=20, sigma=0.6))
        long = iter(sample.generate_texts(int(long_rows.sum()), SEED, mean_words=700, sigma=0.1))
        return [next(long) if is_long else next(short) for is_long in long_rows]
    if case == "tiny":
        texts = sample.generate_texts(rows, SEED, mean_words=2.2, sigma=0.4)
        return [" ".join(text.split()[:4]) for text in texts]
    raise ValueError(f"unknown case {case!r}")


def case_sizes(case: str, args) -> dict[str, int]:
    """Rows of a case's N, 3N and end-to-end corpora."""
    rows = max(1, round(args.case_rows * CASES[case].rows_factor))
    return {"N": rows, "3N": 3 * rows, "e2e": args.e2e_rows}


def write_texts(path: Path, texts: list[str]) -> str:
    """Write a Parquet corpus (`doc_id`, `text`) and return its path."""
    table = pa.table({"doc_id": [f"doc-{i:06d}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, path, row_group_size=1000)
    return str(path)


def write_corpora(prefix: Path, case: str, sizes: dict[str, int]) -> dict[str, str]:
    """One corpus file per named size (`PREFIX-NAME.parquet`), each a prefix of the same texts."""
    texts = case_texts(case, max(sizes.values()))
    return {
        name: write_texts(prefix.with_name(f"{prefix.name}-{name}.parquet"), texts[:rows])
        for name, rows in sizes.items()
    }


def build_model(spec: ModelSpec, root: Path, texts: list[str]) -> str:
    """Build (once) a random-weight model of `spec` with a tokenizer trained on `texts`."""
    out = root / spec.name
    if (out / "config.json").exists():
        return str(out)
    shape = {
        "d_model": spec.d_model,
        "num_layers": spec.layers,
        "vocab_size": spec.tokenizer_vocab,
        "model_vocab_size": spec.vocab,
    }
    if spec.family == "t5":
        sample.build_t5(out, texts, **shape)
    else:
        sample.build_causal(out, texts, spec.family, **shape)
    return str(out)
