"""The stored top-k + logsumexp is exact: a distillation KL from it equals the KL from full logits.

KL(teacher || student) restricted to the teacher's top-k support S is
sum_{i in S} p_t(i) (log p_t(i) - log p_s(i)), with p_t, p_s the full-vocabulary distributions.
From the job's output it needs only the teacher's stored top-k logits minus its stored logsumexp
(no renormalisation); the direct value comes from both models' own unbatched forward passes.
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


def test_topk_kl_from_stored_format_equals_full_logits(tmp_path, model_dirs, corpus, student_dir):
    teacher_dir = model_dirs["t5"]
    assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == (
        AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    )

    # From the job's output: teacher top-k + logsumexp, student full logits.
    teacher_out = run_job(teacher_dir, corpus, tmp_path / "teacher", [f"output.k={K}"])
    student_out = run_job(student_dir, corpus, tmp_path / "student", ["output.logits=full"])
    teacher = sorted_by_key(results.load_arrays(teacher_out))
    student = sorted_by_key(results.load_arrays(student_out))
    np.testing.assert_array_equal(teacher["id"], student["id"])
    np.testing.assert_array_equal(teacher["position"], student["position"])
    t, s = results.to_torch(teacher), results.to_torch(student)
    student_logprobs = s["logits"] - s["logsumexp"].unsqueeze(1)
    stored_kl = kl_on_support(t["topk_logprobs"], student_logprobs.gather(1, t["topk_ids"]))

    # Directly: each model's full logits from an unbatched forward, top-k taken here.
    frame = read_corpus(corpus)
    teacher_ref = reference_rows(teacher_dir, frame, "targets", max_length=MAX_LENGTH)
    student_ref = reference_rows(student_dir, frame, "targets", max_length=MAX_LENGTH)
    keys = list(zip(teacher["id"].tolist(), teacher["position"].tolist(), strict=True))
    assert set(keys) == set(teacher_ref) == set(student_ref)
    teacher_logits = torch.from_numpy(np.stack([teacher_ref[key][1] for key in keys]))
    student_logits = torch.from_numpy(np.stack([student_ref[key][1] for key in keys]))
    support = teacher_logits.topk(K, dim=-1).indices
    direct_kl = kl_on_support(
        torch.log_softmax(teacher_logits, dim=-1).gather(1, support),
        torch.log_softmax(student_logits, dim=-1).gather(1, support),
    )

    assert len(keys) > 200
    assert direct_kl.min() > 0.01  # different weights: a KL that a wrong support would change
    torch.testing.assert_close(stored_kl, direct_kl, atol=1e-4, rtol=0)
    torch.testing.assert_close(stored_kl.mean(), direct_kl.mean(), atol=1e-5, rtol=0)
    # The same support, where the teacher's k-th and (k+1)-th logits are not near-tied.
    sorted_logits = teacher_logits.sort(dim=-1, descending=True).values
    clear = (sorted_logits[:, K - 1] - sorted_logits[:, K]) > 1e-4
    assert clear.sum() > 0.9 * len(keys)
    same = t["topk_ids"][clear].sort(dim=1).values == support[clear].sort(dim=1).values
    assert same.all()
