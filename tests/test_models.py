"""lib.extract.models: one `score` call for every task gives the reduction what it needs, and its logits
are the model's own at each scored position."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from lib.config import DecoderConfig, ModelConfig
from lib.errors import UserError
from lib.extract import batching, hub, models

TEXTS = ["the cat sat on the mat", "a dog", "birds fly south in winter every year"]
TARGETS = ["on the mat", "ran far away", "south"]


@pytest.fixture(scope="module")
def loaded(model_dirs) -> dict[str, models.LoadedModel]:
    cpu = torch.device("cpu")
    return {
        name: models.load_model(ModelConfig(path=model_dirs[name], dtype="float32"), cpu)
        for name in ("gpt2", "t5")
    }


def _batch(lm: models.LoadedModel, task: str) -> batching.Batch:
    table = pa.table({"text": TEXTS, "target": TARGETS})
    tokenized = batching.tokenize_unit(table, lm.tokenizer, task, "", 32, lm.decoder_start_token_id)
    return batching.collate(tokenized.requests, lm.pad_id)


def _logits(lm: models.LoadedModel, scored: models.Scored) -> torch.Tensor:
    return scored.head(scored.states)


@pytest.mark.parametrize(
    "name,task",
    [("gpt2", batching.CAUSAL), ("gpt2", batching.CONTINUATION), ("t5", batching.TARGETS)],
)
def test_score_equals_each_row_alone(loaded, name, task):
    lm = loaded[name]
    batch = _batch(lm, task)
    with torch.inference_mode():
        scored = models.score(lm, batch, task, max_new_tokens=4)
        logits = _logits(lm, scored)
        assert scored.has_tokens and logits.shape == (len(batch.row), lm.vocab_size)
        assert torch.equal(scored.token_id, batch.labels.to(torch.int32))
        for request in batch.requests:  # the row alone, unpadded, through the model's forward
            ids = torch.tensor([request.ids])
            if request.decoder_ids is None:
                alone = lm.model(input_ids=ids).logits[0]
            else:
                alone = lm.model(
                    input_ids=ids, decoder_input_ids=torch.tensor([request.decoder_ids])
                ).logits[0]
            mine = scored.row == request.row
            torch.testing.assert_close(
                logits[mine], alone[scored.position[mine]], atol=1e-4, rtol=1e-4
            )
    assert scored.real_tokens == batch.real_tokens and scored.padded_tokens == batch.padded_tokens


def test_score_start_mode_has_no_tokens(loaded):
    lm = loaded["t5"]
    with torch.inference_mode():
        scored = models.score(lm, _batch(lm, batching.START), batching.START, max_new_tokens=4)
    assert not scored.has_tokens
    assert list(scored.position) == [0, 0, 0] and list(scored.row) == [0, 1, 2]


def test_score_generate_mode_matches_generate(loaded):
    lm = loaded["t5"]
    batch = _batch(lm, batching.GENERATE)
    with torch.inference_mode():
        scored = models.score(lm, batch, batching.GENERATE, max_new_tokens=4)
        for request in batch.requests:
            out = lm.model.generate(
                input_ids=torch.tensor([request.ids]),
                do_sample=False,
                num_beams=1,
                max_new_tokens=4,
                output_logits=True,
                return_dict_in_generate=True,
            )
            mine = scored.row == request.row
            steps = int(mine.sum())
            assert scored.token_id[mine].tolist() == out.sequences[0, 1 : 1 + steps].tolist()
            assert scored.position[mine].tolist() == list(range(steps))
            alone = torch.stack(out.logits, dim=1)[0, :steps]
            torch.testing.assert_close(scored.states[mine], alone, atol=1e-4, rtol=1e-4)


def test_task_for_each_family(loaded):
    gpt2, t5 = loaded["gpt2"], loaded["t5"]
    assert models.task_for(gpt2, DecoderConfig(), has_targets=False) == batching.CAUSAL
    assert models.task_for(gpt2, DecoderConfig(), has_targets=True) == batching.CONTINUATION
    assert models.task_for(gpt2, DecoderConfig(mode="targets"), True) == batching.CONTINUATION
    with pytest.raises(UserError, match="decoder.mode: generate needs a seq2seq model; .* causal"):
        models.task_for(gpt2, DecoderConfig(mode="generate"), has_targets=False)
    for mode in ("start", "targets", "generate"):
        assert models.task_for(t5, DecoderConfig(mode=mode), has_targets=True) == mode
    assert t5.is_seq2seq and not gpt2.is_seq2seq
    assert t5.identity["architecture"] == "T5ForConditionalGeneration"


def test_lengths_beyond_the_positions_are_refused_before_any_model_work(loaded):
    gpt2, t5 = loaded["gpt2"], loaded["t5"]
    assert models.position_limit(gpt2) == 1024 and models.position_limit(t5) is None
    models.check_lengths(gpt2, batching.CAUSAL, 1024, 64)
    models.check_lengths(gpt2, batching.CONTINUATION, 512, 64)
    models.check_lengths(t5, batching.TARGETS, 100_000, 64)  # relative positions: no limit
    with pytest.raises(UserError, match=r"input.max_length: 2048 is more than the model's 1024"):
        models.check_lengths(gpt2, batching.CAUSAL, 2048, 64)
    with pytest.raises(UserError, match=r"context \+ target reach 1200 tokens.*at most 512"):
        models.check_lengths(gpt2, batching.CONTINUATION, 600, 64)


def test_a_tokenizer_may_be_smaller_than_the_embeddings_but_not_larger(
    loaded, model_dirs, tmp_path
):
    """T5's SentencePiece tokenizer has fewer tokens than embedding rows (padded to 328): fine.
    One token past the rows is refused at load time, naming both sizes and the id."""
    sizes = {
        name: (lm.identity["tokenizer_size"], lm.model.get_input_embeddings().weight.shape[0])
        for name, lm in loaded.items()
    }
    assert sizes == {"gpt2": (300, 300), "t5": (300, 328)}
    from transformers import AutoTokenizer

    shutil.copytree(model_dirs["gpt2"], tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    tokenizer.add_tokens(["<one-more>"])
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError) as error:
        models.load_model(ModelConfig(path=str(tmp_path / "gpt2")), torch.device("cpu"))
    assert str(error.value) == (
        f"model.path {tmp_path / 'gpt2'}: the tokenizer has 301 tokens but the model's input "
        "embeddings only 300 rows; token id 300 would index past them (tokens added to the "
        "tokenizer without resizing the model?)"
    )


def test_a_hub_id_with_no_hub_in_reach_fails_fast_in_one_line(monkeypatch, tmp_path, model_dirs):
    """No network (the hub's name does not resolve here, or the probe is told it failed): the
    cache alone is asked, and the error says how to run offline."""
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    started = time.perf_counter()
    with pytest.raises(UserError) as error:
        models.load_model(ModelConfig(path="no-such-org/no-such-model"), torch.device("cpu"))
    assert time.perf_counter() - started < 20  # no half-minute of retries
    message = str(error.value)
    assert "hub cannot be reached" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message
    # A path under ~ is the user's own directory.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").symlink_to(model_dirs["gpt2"])
    lm = models.load_model(ModelConfig(path="~/ckpt"), torch.device("cpu"))
    assert lm.identity["path"] == str(tmp_path / "ckpt")
    # A local path is never sent to the hub: the error names what is wrong with it.
    for path, line in (
        ("/no/such/model", "model.path /no/such/model: no such directory"),
        ("data/no/model", "model.path data/no/model: no such directory"),
        (__file__, f"model.path {__file__} is a file; expected a checkpoint directory or a hub id"),
    ):
        with pytest.raises(UserError) as error:
            models.load_model(ModelConfig(path=path), torch.device("cpu"))
        assert str(error.value) == line


def test_a_model_whose_body_needs_its_head_runs_whole(model_dirs, tmp_path):
    """Mamba's forward reads lm_head.weight: the split check falls back to the full forward
    (it used to fail the load), and the rows still equal the model's own logits."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, state_size=4)
    MambaForCausalLM(config).save_pretrained(tmp_path)
    for source in Path(model_dirs["gpt2"]).glob("*token*"):  # the GPT-2 fixture's tokenizer
        shutil.copy(source, tmp_path)
    lm = models.load_model(ModelConfig(path=str(tmp_path), dtype="float32"), torch.device("cpu"))
    assert lm.head is None and lm.identity["split_head"] is False
    batch = _batch(lm, batching.CAUSAL)
    with torch.inference_mode():
        scored = models.score(lm, batch, batching.CAUSAL, max_new_tokens=4)
        logits = _logits(lm, scored)
        for request in batch.requests:
            alone = lm.model(input_ids=torch.tensor([request.ids])).logits[0]
            mine = scored.row == request.row
            torch.testing.assert_close(
                logits[mine], alone[scored.position[mine]], atol=1e-4, rtol=1e-4
            )


def test_float16_t5_warns_in_one_line(model_dirs, caplog):
    """A warning through logging: `warnings.warn` printed the source line under it."""
    with caplog.at_level(logging.WARNING, logger="lib.extract.models"):
        models.load_model(ModelConfig(path=model_dirs["t5"], dtype="float16"), torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "model.dtype=float16 with a T5-family model overflows to inf/nan; use bfloat16"
    ]
