"""The unbatched, unpadded Hugging Face forward that the job's rows must equal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


def load(model_dir: str):
    config = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def read_corpus(path: str) -> pd.DataFrame:
    return pq.read_table(path).to_pandas() if path.endswith(".parquet") else pd.read_parquet(path)


@torch.inference_mode()
def reference_rows(
    model_dir: str,
    frame: pd.DataFrame,
    mode: str,
    prefix: str = "",
    max_length: int = 512,
    max_new_tokens: int = 8,
    id_column: str = "doc_id",
) -> dict:
    """{(id, position): (token_id or None, float32 logits (V,))}, one input row at a time."""
    model, tok = load(model_dir)
    out = {}
    for _, rec in frame.iterrows():
        text, row_id = rec["text"], rec[id_column]
        if text is None:
            continue
        ids = tok(prefix + text, truncation=True, max_length=max_length)["input_ids"]
        if not ids:
            continue
        steps = _steps(model, tok, mode, ids, rec.get("target"), max_length, max_new_tokens)
        for position, token, logits in steps:
            out[(row_id, position)] = (token, logits.float().numpy())
    return out


def _steps(model, tok, mode: str, ids: list[int], target, max_length: int, max_new_tokens: int):
    """(position, token or None, logits) of one row, unbatched, as `mode` scores it."""
    if mode == "causal":
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        return [(p, ids[p + 1] if p + 1 < len(ids) else None, logits[p]) for p in range(len(ids))]
    if mode == "continuation":
        tgt = tok(target, add_special_tokens=False, truncation=True, max_length=max_length)
        seq = ids + tgt["input_ids"]
        if len(seq) == len(ids):
            return []
        logits = model(input_ids=torch.tensor([seq])).logits[0]
        return [(p, seq[p + 1], logits[p]) for p in range(len(ids) - 1, len(seq) - 1)]
    start = model.config.decoder_start_token_id
    if mode == "start":
        decoder = torch.tensor([[start]])
        return [
            (0, None, model(input_ids=torch.tensor([ids]), decoder_input_ids=decoder).logits[0, 0])
        ]
    if mode == "targets":
        tgt = tok(text_target=target, truncation=True, max_length=max_length)["input_ids"]
        decoder = torch.tensor([[start] + tgt[:-1]])
        logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=decoder).logits[0]
        return [(p, tgt[p], logits[p]) for p in range(len(tgt))]
    if mode == "generate":
        gen = model.generate(
            input_ids=torch.tensor([ids]),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = gen.sequences[0, -len(gen.logits) :].tolist()
        steps = []
        for p, (token, logits) in enumerate(zip(tokens, gen.logits, strict=False)):
            steps.append((p, token, logits[0]))
            if token == model.generation_config.eos_token_id:
                break
        return steps
    raise ValueError(mode)


def stats64(logits: np.ndarray) -> dict[str, float]:
    """A position's distribution statistics in float64: entropy, the mean and std of log p
    under p (Min-K%++), and the top-1 log-probability."""
    x = logits.astype(np.float64)
    logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    p = np.exp(logp)
    mean = float((p * logp).sum())
    return {
        "entropy": -mean,
        "mu": mean,
        "sigma": float(np.sqrt((p * logp**2).sum() - mean**2)),
        "top1_logprob": float(logp.max()),
        "logp": logp,
    }


def assert_matches(
    result: pd.DataFrame, reference: dict, k: int, atol: float = 1e-3, full: bool = False
) -> None:
    """Every output row equals the reference: same keys, logits within atol, same top-k ids without ties."""
    keys = list(zip(result["id"], result["position"], strict=False))
    assert len(keys) == len(set(keys)), "duplicate (id, position) rows"
    assert set(keys) == set(reference), (
        f"rows differ: {len(set(keys) - set(reference))} extra, {len(set(reference) - set(keys))} missing"
    )
    for rec, key in zip(result.itertuples(index=False), keys, strict=False):
        token, logits = reference[key]
        lse = float(torch.logsumexp(torch.from_numpy(logits), 0))
        assert abs(rec.logsumexp - lse) < atol, (key, rec.logsumexp, lse)
        assert abs(rec.entropy - stats64(logits)["entropy"]) < atol, (key, rec.entropy)
        if token is None:
            assert (
                pd.isna(rec.token_id) and pd.isna(rec.token_logprob) and pd.isna(rec.token_rank)
            ), key
        else:
            assert rec.token_id == token, key
            assert abs(rec.token_logprob - (logits[token] - lse)) < atol, key
            near = np.abs(logits - logits[token]) < atol
            higher = int((logits > logits[token]).sum())
            assert abs(rec.token_rank - higher) <= int(near.sum()) - 1, (
                key,
                rec.token_rank,
                higher,
            )
        if full:
            np.testing.assert_allclose(
                np.asarray(rec.logits, dtype=np.float32), logits, atol=atol, rtol=0
            )
            continue
        order = np.argsort(-logits, kind="stable")[:k]
        values = np.asarray(rec.topk_logits, dtype=np.float32)
        np.testing.assert_allclose(values, logits[order], atol=atol, rtol=0, err_msg=str(key))
        gaps = np.abs(np.diff(np.sort(logits)[::-1][: k + 1]))
        if gaps.min() > 2 * atol:  # no ties within tolerance: ids must agree exactly
            assert list(rec.topk_ids) == order.tolist(), key


def float64_topk(reference: dict, keys: list, k: int) -> dict[str, np.ndarray]:
    """For each key, from the reference's whole row in float64: the top-k log-probabilities
    (descending) and ids, log p of every entry (a list of rows, to look up stored ids), the
    logsumexp, the entropy and the token's log-probability (NaN where there is no token)."""
    rows = {"logp": [], "top_logp": [], "top_ids": [], "logsumexp": [], "entropy": [], "token": []}
    for key in keys:
        token, logits = reference[key]
        x = logits.astype(np.float64)
        lse = x.max() + np.log(np.exp(x - x.max()).sum())
        logp = x - lse
        top = np.argpartition(-logp, k)[:k]
        top = top[np.argsort(-logp[top], kind="stable")]
        p = np.exp(logp)
        rows["logp"].append(logp)
        rows["top_logp"].append(logp[top])
        rows["top_ids"].append(top)
        rows["logsumexp"].append(lse)
        rows["entropy"].append(-(p * np.where(p > 0, logp, 0)).sum())
        rows["token"].append(np.nan if token is None else logp[token])
    return {name: values if name == "logp" else np.array(values) for name, values in rows.items()}


def assert_topk_storage(
    arrays: dict, reference: dict, k: int, *, top_p: float, min_k: int, bound: float
) -> None:
    """Stored top-k rows (as lib.results.load_arrays decodes them) against the unbatched
    float64 reference: each row keeps the shortest prefix reaching `top_p` in mass (within
    [min_k, k]; either count where a prefix mass lies within 1e-4 of top_p), its ids are the
    reference's top ids (as sets where the cut falls in a near-tie), every stored finite
    log-probability and token log-probability is within `bound` of the reference, past the
    count ids are -1 and log-probabilities -inf, and rows are in descending order."""
    keys = list(zip(arrays["id"].tolist(), arrays["position"].tolist(), strict=True))
    assert len(keys) == len(set(keys)) and set(keys) == set(reference)
    want = float64_topk(reference, keys, k)
    mass = np.cumsum(np.exp(want["top_logp"]), axis=1)
    count = (
        np.clip((mass < top_p).sum(axis=1) + 1, min_k, k) if top_p < 1 else np.full(len(keys), k)
    )
    near = np.abs(mass - top_p).min(axis=1) < 1e-4 if top_p < 1 else np.zeros(len(keys), bool)
    got = arrays["topk_count"]
    np.testing.assert_array_equal(got[~near], count[~near])
    assert (np.abs(got - count) <= 1).all()
    kept = np.arange(k) < got[:, None]
    ids, stored = arrays["topk_ids"], arrays["topk_logprobs"]
    assert (ids[~kept] == -1).all() and np.isneginf(stored[~kept]).all()
    # Every stored (id, log-probability) pair against the reference's log p of that id.
    rows = np.nonzero(kept)[0]
    exact = np.concatenate(
        [logp[row[:n]] for logp, row, n in zip(want["logp"], ids, got, strict=True)]
    )
    error = np.abs(stored[kept].astype(np.float64) - exact)
    assert error.max() <= bound, error.max()
    if top_p == 1:  # the tail below -20 is checked too
        assert (exact < -20).any()
    # The stored ids are the reference's top ids: the same sequence, up to near-ties.
    cut = want["top_logp"][np.arange(len(keys)), got - 1]
    assert (exact >= cut[rows] - 2e-3).all()  # nothing below the cut, up to a near-tie
    assert all(len(set(row[:n])) == n for row, n in zip(ids, got, strict=True))  # distinct
    with np.errstate(invalid="ignore"):  # -inf - -inf
        assert not (np.diff(stored, axis=1) > 0)[kept[:, 1:]].any()
    np.testing.assert_allclose(arrays["logsumexp"], want["logsumexp"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(arrays["entropy"], want["entropy"], atol=2e-3, rtol=2**-11)
    token = ~np.isnan(want["token"])
    np.testing.assert_array_equal(arrays["has_token"], token)
    np.testing.assert_allclose(
        arrays["token_logprob"][token], want["token"][token], atol=bound, rtol=0
    )
