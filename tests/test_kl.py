"""The stored top-k + logsumexp is exact: a distillation KL from it equals the KL from full logits.

KL(teacher || student) restricted to the teacher's top-k support S is
sum_{i in S} p_t(i) (log p_t(i) - log p_s(i)), with p_t, p_s the full-vocabulary distributions.
From the job's output it needs only the teacher's stored top-k logits minus its stored logsumexp
(no renormalisation); the direct value comes from both models' own unbatched forward passes.
Compact output (with and without top_p) gives it within the bound its log-probabilities keep.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration

from jobs import extract
from lib import results
from tests.reference import read_corpus, reference_rows

K = 8
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, model_dirs) -> str:
    """The teacher's architecture and tokenizer with other random weights."""
    out = tmp_path_factory.mktemp("student") / "t5"
    shutil.copytree(model_dirs["t5"], out)
    torch.manual_seed(1234)
    T5ForConditionalGeneration(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return str(out)


def run_job(model_dir: str, corpus: str, out, overrides: list[str]) -> str:
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        f"output.dir={out}",
        "input.id_column=doc_id",
        "input.target_column=target",
        "decoder.mode=targets",
        f"input.max_length={MAX_LENGTH}",
        "model.dtype=float32",
        "output.dtype=float32",
        *overrides,
    ]
    assert extract.main(argv) == 0
    return str(out)


def sorted_by_key(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((arrays["position"], arrays["id"]))
    return {name: values[order] for name, values in arrays.items()}


def kl_on_support(teacher_logprobs, student_logprobs):
    """sum over the support of p_t (log p_t - log p_s), from (N, k) log-probabilities."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)


@pytest.fixture(scope="module")
def kl_case(tmp_path_factory, model_dirs, corpus, student_dir) -> dict:
    """The student's full-logit output, and both models' unbatched forward passes."""
    teacher_dir = model_dirs["t5"]
    assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == (
        AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    )
    out = tmp_path_factory.mktemp("kl") / "student"
    student = sorted_by_key(
        results.load_arrays(run_job(student_dir, corpus, out, ["output.logits=full"]))
    )
    frame = read_corpus(corpus)
    return {
        "student": student,
        "teacher_ref": reference_rows(teacher_dir, frame, "targets", max_length=MAX_LENGTH),
        "student_ref": reference_rows(student_dir, frame, "targets", max_length=MAX_LENGTH),
    }


# Teacher settings -> the error bound of its stored log-probabilities (compact: half a step).
TEACHERS = {
    "plain": ([], 0.0),
    "compact": (["output.encoding=compact"], 1 / 104),
    "compact-top_p": (["output.encoding=compact", "output.top_p=0.9", "output.min_k=2"], 1 / 104),
}


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_topk_kl_from_stored_format_equals_full_logits(
    tmp_path, model_dirs, corpus, kl_case, teacher
):
    settings, bound = TEACHERS[teacher]
    # From the job's output: teacher top-k + logsumexp (or compact codes), student full logits.
    teacher_out = run_job(
        model_dirs["t5"], corpus, tmp_path / "teacher", [f"output.k={K}", *settings]
    )
    t_arrays = sorted_by_key(results.load_arrays(teacher_out))
    student = kl_case["student"]
    np.testing.assert_array_equal(t_arrays["id"], student["id"])
    np.testing.assert_array_equal(t_arrays["position"], student["position"])
    t, s = results.to_torch(t_arrays), results.to_torch(student)
    student_logprobs = s["logits"] - s["logsumexp"].unsqueeze(1)
    # README's loss; past a row's topk_count (top_p) ids are -1 and log-probabilities -inf.
    kept = t["topk_ids"] >= 0
    terms = t["topk_logprobs"].exp() * (
        t["topk_logprobs"] - student_logprobs.gather(1, t["topk_ids"].clamp(min=0))
    )
    stored_kl = torch.where(kept, terms, 0).sum(dim=-1)
    if kept.all():  # without top_p the README's example runs as it is written
        readme_kl = kl_on_support(t["topk_logprobs"], student_logprobs.gather(1, t["topk_ids"]))
        torch.testing.assert_close(readme_kl, stored_kl, atol=0, rtol=0)

    # Directly: each model's full logits from an unbatched forward, on the stored support.
    keys = list(zip(t_arrays["id"].tolist(), t_arrays["position"].tolist(), strict=True))
    teacher_ref, student_ref = kl_case["teacher_ref"], kl_case["student_ref"]
    assert set(keys) == set(teacher_ref) == set(student_ref)
    teacher_logits = torch.from_numpy(np.stack([teacher_ref[key][1] for key in keys])).double()
    student_logits = torch.from_numpy(np.stack([student_ref[key][1] for key in keys])).double()
    support = t["topk_ids"].clamp(min=0)
    teacher_lp = torch.log_softmax(teacher_logits, dim=-1).gather(1, support)
    student_lp = torch.log_softmax(student_logits, dim=-1).gather(1, support)
    p = torch.where(kept, teacher_lp.exp(), 0)
    direct_kl = (p * (teacher_lp - student_lp)).sum(dim=-1)

    assert len(keys) > 200
    assert direct_kl.min() > 0.01  # different weights: a KL that a wrong support would change
    # Stored log-probabilities within `bound` of the exact ones move each term p (lt - ls) by
    # at most p (e^b - 1) |lt - ls| + p e^b b.
    tolerance = (
        np.expm1(bound) * (p * (teacher_lp - student_lp).abs()).sum(dim=-1)
        + np.exp(bound) * bound * p.sum(dim=-1)
        + 1e-4
    )
    assert ((stored_kl.double() - direct_kl).abs() <= tolerance).all()
    if bound == 0:
        torch.testing.assert_close(stored_kl.double().mean(), direct_kl.mean(), atol=1e-5, rtol=0)
    # The same support as the full logits' top-k, where the k-th and (k+1)-th are not near-tied.
    sorted_logits = teacher_logits.sort(dim=-1, descending=True).values
    clear = (sorted_logits[:, K - 1] - sorted_logits[:, K]) > 1e-4
    assert clear.sum() > 0.9 * len(keys)
    full_support = teacher_logits.topk(K, dim=-1).indices[clear]
    if kept.all():
        same = t["topk_ids"][clear].sort(dim=1).values == full_support.sort(dim=1).values
        assert same.all()
    else:  # the kept prefix of it: top_p keeps the most probable entries
        kept_ids = t["topk_ids"][clear]
        assert (torch.isin(kept_ids, full_support) | (kept_ids < 0)).all()
        assert 1 < kept.sum(dim=1).float().mean() < K
