"""lib/sample: the generated corpus, the docstring corpus, and the tiny models, which load like
any Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lib import sample
from lib.sample import default, docstrings


@pytest.mark.parametrize("name", ["t5", "gpt2", "llama"])
def test_models_load_from_their_directory(model_dirs, name):
    path = Path(model_dirs[name])
    # Safetensors only: nothing pickled, so the job's default (no pickle) loads them.
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM
    assert config.is_encoder_decoder == (name == "t5")
    model = cls.from_pretrained(path, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert 100 < len(tok) <= 300  # the fixture asks for 300 pieces
    ids = tok("Kala mon pou ti.", return_tensors="pt")
    with torch.inference_mode():
        if name == "t5":
            decoder = torch.tensor([[config.decoder_start_token_id]])
            logits = model(**ids, decoder_input_ids=decoder).logits
        else:
            logits = model(**ids).logits
    out_vocab = model.get_output_embeddings().weight.shape[0]
    assert out_vocab == config.vocab_size
    assert logits.shape[-1] == out_vocab and torch.isfinite(logits).all()
    if name == "t5":
        assert out_vocab > len(tok)  # as in the real t5: logits are wider than the tokenizer
        assert config.decoder_start_token_id == tok.pad_token_id == 0
        assert tok("x")["input_ids"][-1] == tok.eos_token_id == config.eos_token_id
    else:
        assert out_vocab == len(tok)
        assert max(tok.get_vocab().values()) < out_vocab
    if name == "llama":
        # BOS first, like Llama.
        assert tok("x")["input_ids"][0] == tok.bos_token_id == config.bos_token_id
    if name == "gpt2":
        # No special tokens at all, like GPT-2.
        assert tok("x y")["input_ids"] == tok("x y", add_special_tokens=False)["input_ids"]


def test_models_are_reproducible_per_seed(tmp_path, texts):
    first = sample.build_causal(
        tmp_path / "a", texts[:50], "gpt2", d_model=16, num_layers=1, vocab_size=280, seed=5
    )
    again = sample.build_causal(
        tmp_path / "b", texts[:50], "gpt2", d_model=16, num_layers=1, vocab_size=280, seed=5
    )
    other = sample.build_causal(
        tmp_path / "c", texts[:50], "gpt2", d_model=16, num_layers=1, vocab_size=280, seed=6
    )
    weights = [
        AutoModelForCausalLM.from_pretrained(p).lm_head.weight for p in (first, again, other)
    ]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
    assert (first / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_generate_texts_is_deterministic_per_seed():
    texts = sample.generate_texts(50, seed=3)
    assert texts == sample.generate_texts(50, seed=3)
    assert texts != sample.generate_texts(50, seed=4)
    assert sample.generate_texts(20, seed=3) == texts[:20]  # a prefix of the same stream
    assert all(t and t[0].isupper() and t[-1] in ".!?" for t in texts)


def test_generate_texts_lengths_are_log_normal():
    words = np.array([len(t.split()) for t in sample.generate_texts(3000, seed=0, mean_words=24.0)])
    logs = np.log(words)
    # Median near mean_words, log-lengths spread by sigma=0.9, and a long right tail.
    assert 20 <= np.median(words) <= 28
    assert 0.75 <= logs.std() <= 1.0
    assert words.mean() > 1.3 * np.median(words)
    skew = ((words - words.mean()) ** 3).mean() / words.std() ** 3
    assert skew > 2
    assert words.max() > 10 * np.median(words) and words.min() <= 3
    # The logs are roughly symmetric (normal).
    assert abs(((logs - logs.mean()) ** 3).mean() / logs.std() ** 3) < 0.5


def test_write_corpus(tmp_path):
    path = sample.write_corpus(tmp_path / "sub" / "c.parquet", rows=120, seed=2, row_group_size=50)
    file = pq.ParquetFile(path)
    assert file.schema_arrow.names == ["doc_id", "text", "target"]
    assert file.metadata.num_row_groups == 3
    table = file.read()
    assert table.column("text").to_pylist() == sample.generate_texts(120, seed=2)
    ids = table.column("doc_id").to_pylist()
    assert len(set(ids)) == 120 and ids[0] == "doc-2-000000"
    assert table.column("target").null_count == 0
    no_targets = sample.write_corpus(tmp_path / "d.parquet", rows=5, with_targets=False)
    assert pq.read_schema(no_targets).names == ["doc_id", "text"]


def test_docstring_corpus_is_real_text_split_by_module():
    docs = docstrings.collect()
    assert docs == docstrings.collect()
    assert len(docs) > 1000
    assert len({(d.text, d.target) for d in docs}) == len(docs)  # each docstring once
    assert all(d.text and len(d.target.split()) >= 2 for d in docs)
    found = {d.name: d for d in docs}
    loads = found["json.loads"]
    assert loads.module == "json" and loads.text.startswith("json.loads(s, *")
    assert loads.target.startswith("Deserialize")
    # A module is wholly held out or wholly in training, about a fifth held out.
    modules = docstrings.module_names()
    held = [m for m in modules if docstrings.held_out(m)]
    assert 0.1 < len(held) / len(modules) < 0.3
    assert held == [m for m in modules if docstrings.held_out(m)]
    rows = [d for d in docs if docstrings.held_out(d.module)]
    assert 0.1 < len(rows) / len(docs) < 0.4


def test_shipped_models_predict_held_out_text(tmp_path):
    """The trained sample models are small, float16, and far better than chance on text they never
    saw (the job's own figures on them are in test_cli)."""
    info = sample.build_default_sample(tmp_path)
    # A sample of another version (an older checkout's) is replaced, not kept.
    (tmp_path / "sample.json").write_text('{"model": "old"}')
    (Path(info["model"]) / "stale.bin").write_bytes(b"old")
    assert sample.build_default_sample(tmp_path) == info
    assert not (Path(info["model"]) / "stale.bin").exists()
    table = pq.read_table(info["corpus"])
    held = [d.name for d in docstrings.collect() if docstrings.held_out(d.module)]
    assert table.column("doc_id").to_pylist() == held
    size = sum(p.stat().st_size for p in default.MODELS.rglob("*") if p.is_file())
    assert size < 3_000_000
    path = Path(info["causal_model"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert AutoConfig.from_pretrained(path).dtype == torch.float16
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(" ".join(table.column("text").to_pylist()[:20]), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids[:, :512]).logits[0, :-1]
    logprobs = logits.log_softmax(-1).gather(-1, ids[0, 1:512, None])[:, 0]
    # Chance is a perplexity of len(tok) = 2,000 and a top-1 accuracy of 1/2,000.
    assert float((-logprobs.mean()).exp()) < len(tok) / 8
    assert float((logits.argmax(-1) == ids[0, 1:512]).float().mean()) > 0.08
