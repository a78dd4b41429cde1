"""The T5 attention path without a per-row bias tensor equals transformers' SDPA and unpadded rows."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, T5ForConditionalGeneration
from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

from lib.extract import attention


def _t5(path: str, dtype=torch.float32, switched: bool = True):
    model = T5ForConditionalGeneration.from_pretrained(
        path, attn_implementation="sdpa", dtype=dtype
    ).eval()
    if switched:
        assert attention.use_key_mask_attention(model)
    return model


def _padded_batch(lengths: list[int], decoder_lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width, decoder_width = max(lengths), max(decoder_lengths)
    ids = torch.randint(3, 250, (len(lengths), width), generator=generator)
    decoder_ids = torch.randint(3, 250, (len(lengths), decoder_width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask, decoder_ids


@torch.inference_mode()
def test_padded_batch_equals_unpadded_rows(model_dirs):
    model = _t5(model_dirs["t5"])
    lengths, decoder_lengths = [37, 5, 21, 1, 37, 12], [4, 1, 6, 2, 6, 3]
    ids, mask, decoder_ids = _padded_batch(lengths, decoder_lengths)
    batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    for row, (length, decoder_length) in enumerate(zip(lengths, decoder_lengths, strict=True)):
        alone = model(
            input_ids=ids[row : row + 1, :length],
            decoder_input_ids=decoder_ids[row : row + 1, :decoder_length],
        ).logits
        torch.testing.assert_close(batched[row, :decoder_length], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["per-key-length", "one-column", "cuda-columns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_equals_transformers_sdpa(model_dirs, dtype, path, monkeypatch):
    if path != "per-key-length":  # the extra-dimension path, which CUDA takes
        monkeypatch.setattr(attention, "attention_per_key_length", lambda *args: None)
    if path == "cuda-columns":  # the head size CUDA gets, a multiple of 8
        monkeypatch.setattr(attention, "extra_columns", lambda query: 8 - query.shape[-1] % 8)
    ours, theirs = _t5(model_dirs["t5"], dtype), _t5(model_dirs["t5"], dtype, switched=False)
    ids, mask, decoder_ids = _padded_batch([40, 9, 26, 3], [5, 5, 2, 1], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    expected = theirs(**kwargs).logits.float()
    got = ours(**kwargs).logits.float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_padding_mask_is_a_view_over_the_keys():
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    arguments = dict(batch_size=2, q_length=3, kv_length=4, attention_mask=keep)
    view = attention.key_padding_mask(mask_function=bidirectional_mask_function, **arguments)
    assert view.stride(-2) == 0
    expected = sdpa_mask(mask_function=bidirectional_mask_function, **arguments)
    assert torch.equal(view, expected)
    all_kept = dict(arguments, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    assert attention.key_padding_mask(allow_is_bidirectional_skip=True, **all_kept) is None


def test_only_position_bias_models_switch(model_dirs):
    causal = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], attn_implementation="sdpa")
    assert not attention.use_key_mask_attention(causal)
    assert causal.config._attn_implementation == "sdpa"
    eager = _t5(model_dirs["t5"], switched=False)
    eager.set_attn_implementation("eager")
    assert not attention.use_key_mask_attention(eager)


def test_a_wrong_result_switches_back(model_dirs, monkeypatch):
    """The load-time check on a padded dummy batch catches an attention that ignores padding."""

    def ignore_padding(module, query, key, value, attention_mask, **kwargs):
        return attention.sdpa_attention_forward(module, query, key, value, None, **kwargs)

    monkeypatch.setattr(attention, "key_mask_sdpa_forward", ignore_padding)
    model = _t5(model_dirs["t5"], switched=False)
    try:
        assert not attention.use_key_mask_attention(model)
        assert model.config._attn_implementation == "sdpa"
    finally:  # the registry is global: give the name its real function back
        monkeypatch.undo()
        attention.AttentionInterface.register(attention.NAME, attention.key_mask_sdpa_forward)


def test_per_key_length_path_takes_only_right_padding():
    """Left padding, a row with no real key and a mask of another batch size go elsewhere."""
    query = key = value = torch.randn(2, 4, 6, 8)
    bias = torch.randn(1, 4, 6, 6)
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    left = right.flip(-1)
    empty_row = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for keep, taken in ((right, True), (left, False), (empty_row, False), (right[:1], False)):
        mask = keep[:, None, None, :].expand(len(keep), 1, 6, 6)
        output = attention.attention_per_key_length(query, key, value, mask, bias, 1.0)
        assert (output is not None) == taken
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[1:], key[1:, :, :3], value[1:, :, :3], attn_mask=bias[..., :3], scale=1.0
    )
    mask = right[:, None, None, :].expand(2, 1, 6, 6)
    output = attention.attention_per_key_length(query, key, value, mask, bias, 1.0)
    torch.testing.assert_close(output[1], expected[0].transpose(0, 1))


def _cross_projections(model) -> list[int]:
    """A counter of the calls to the decoder's cross-attention key projections."""
    calls = [0]
    for module in attention.cross_attentions(model):
        module.k.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("implementation", ["switched", "sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_folded_cross_attention_equals_projected(model_dirs, dtype, implementation):
    """Bool masks (SDPA), additive masks (eager), both dtypes; few decoder positions fold, many
    do not."""
    theirs = _t5(model_dirs["t5"], dtype, switched=implementation == "switched")
    ours = _t5(model_dirs["t5"], dtype, switched=implementation == "switched")
    if implementation == "eager":
        theirs.set_attn_implementation("eager")
        ours.set_attn_implementation("eager")
    assert attention.use_folded_cross_attention(ours)
    assert len(attention.cross_attentions(ours)) == ours.config.num_decoder_layers
    projections = _cross_projections(ours)
    ids, mask, decoder_ids = _padded_batch([40, 9, 26, 3], [1, 1, 1, 1], seed=2)
    for decoder_length in (1, 3, 40):  # head_dim 8: 40 decoder positions over 40 keys do not fold
        kwargs = dict(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=decoder_ids[:, :1].repeat(1, decoder_length),
        )
        expected = theirs(**kwargs, use_cache=False).logits.float()
        projections[0] = 0
        got = ours(**kwargs, use_cache=False).logits.float()
        assert projections[0] == (ours.config.num_decoder_layers if decoder_length == 40 else 0)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@torch.inference_mode()
def test_generation_keeps_its_cached_cross_attention(model_dirs):
    theirs, ours = _t5(model_dirs["t5"]), _t5(model_dirs["t5"])
    assert attention.use_folded_cross_attention(ours)
    projections = _cross_projections(ours)
    ids, mask, _ = _padded_batch([30, 7, 15], [1], seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))
    assert projections[0] == ours.config.num_decoder_layers  # projected once, then cached


def test_a_wrong_fold_is_undone(model_dirs, monkeypatch):
    def ignore_padding(module, hidden_states, mask=None, **kwargs):
        return attention.folded_cross_attention(module, hidden_states, None, **kwargs)

    monkeypatch.setattr(attention, "folded_cross_attention", ignore_padding)
    model = _t5(model_dirs["t5"])
    assert not attention.use_folded_cross_attention(model)
    assert all("forward" not in vars(m) for m in attention.cross_attentions(model))
    causal = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], attn_implementation="sdpa")
    assert not attention.use_folded_cross_attention(causal)


def test_a_folded_model_is_freed_without_a_garbage_collection(model_dirs):
    """Its device memory goes when the last reference does (repeated jobs in one process)."""
    model = _t5(model_dirs["t5"])
    assert attention.use_folded_cross_attention(model)
    gone = [weakref.ref(module) for module in [model, *attention.cross_attentions(model)]]
    gc.disable()
    try:
        del model
        assert [ref() for ref in gone] == [None] * len(gone)
    finally:
        gc.enable()
