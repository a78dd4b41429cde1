"""Teacher columns (output.probes, output.temperatures, output.samples) against an unbatched
float64 forward, the samples' distribution, and their independence from batching and resumes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import extract
from lib import results, sample
from lib.config import load_config
from lib.extract import reduce, sampling
from lib.output.resume import fingerprint
from tests.conftest import write_rows
from tests.reference import load

TEMPERATURES = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("teacher")
    texts = sample.generate_texts(24, seed=31, mean_words=10)
    targets = sample.generate_texts(24, seed=32, mean_words=5)
    return write_rows(root / "rows.parquet", texts, targets, [f"r{i}" for i in range(24)])


def single_tokens(model_dir: str, count: int) -> list[str]:
    """`count` strings that are each one token of the model's tokenizer (the probes)."""
    _, tok = load(model_dir)
    found = []
    for piece in sorted(tok.get_vocab(), key=lambda p: tok.convert_tokens_to_ids(p)):
        text = tok.convert_tokens_to_string([piece])
        if text.strip() and tok(text, add_special_tokens=False)["input_ids"] == [
            tok.convert_tokens_to_ids(piece)
        ]:
            found.append(text)
        if len(found) == count:
            return found
    raise AssertionError("too few single-token strings")


def run_job(model: str, corpus: str, out: Path, *extra: str) -> None:
    args = [
        f"model.path={model}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "output.k=4",
        "input.max_length=32",
        "output.report=false",
        *extra,
    ]
    assert extract.main(args) == 0


_MODELS: dict[str, torch.nn.Module] = {}


@torch.inference_mode()
def float64_logits(model_dir: str, ids: list[int], decoder: list[int] | None = None):
    """(T, V) float64 logits of one unbatched, unpadded sequence."""
    if model_dir not in _MODELS:
        _MODELS[model_dir] = load(model_dir)[0].double()
    model = _MODELS[model_dir]
    if decoder is None:
        return model(input_ids=torch.tensor([ids])).logits[0]
    return model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder])).logits[0]


def check_teacher_row(arrays: dict, i: int, logits: torch.Tensor, probes: list[int]) -> None:
    """One output row's teacher columns against float64 logits of its position."""
    logp = logits.log_softmax(-1)
    np.testing.assert_allclose(arrays["probe_logprobs"][i], logp[probes].numpy(), atol=1e-4)
    lse_t = [float(torch.logsumexp(logits / t, -1)) for t in TEMPERATURES]
    np.testing.assert_allclose(arrays["logsumexp_t"][i], lse_t, rtol=0, atol=1e-4)
    at_t = (logits / TEMPERATURES[1]).log_softmax(-1)
    drawn = arrays["sample_ids"][i].astype(np.int64)
    np.testing.assert_allclose(arrays["sample_logprobs"][i], at_t[drawn].numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_teacher_columns_equal_unbatched_float64(model_dirs, rows, tmp_path, family):
    model = model_dirs[family]
    _, tok = load(model)
    probes = single_tokens(model, 3)
    probe_ids = [tok(p, add_special_tokens=False)["input_ids"][0] for p in probes]
    out = tmp_path / "out"
    run_job(
        model,
        rows,
        out,
        f"output.probes={json.dumps(probes)}",
        f"output.temperatures={TEMPERATURES}",
        "output.samples=5",
        f"output.sample_temperature={TEMPERATURES[1]}",
        *(["decoder.mode=targets", "input.target_column=target"] if family == "t5" else []),
        "batching.max_tokens=200",
    )
    arrays = results.load_arrays(out)
    assert arrays["probe_logprobs"].shape == (len(arrays["id"]), 3)
    assert arrays["logsumexp_t"].dtype == np.float32 and arrays["sample_ids"].dtype == np.int32
    # Temperature 1 recovers the stored logsumexp; topk_logits / T - logsumexp_t are exact.
    frame = results.load_frame(out).set_index(["id", "position"])
    corpus = results.input_frame(rows, "doc_id").set_index("id")
    checked, cache = 0, {}
    for i, (row_id, position) in enumerate(zip(arrays["id"], arrays["position"], strict=True)):
        if row_id not in cache:
            text = corpus.loc[row_id]
            ids = tok(text["text"], truncation=True, max_length=32)["input_ids"]
            target = tok(text_target=text["target"], truncation=True, max_length=32)["input_ids"]
            decoder = [0, *target[:-1]] if family == "t5" else None
            cache[row_id] = float64_logits(model, ids, decoder)
        check_teacher_row(arrays, i, cache[row_id][position], probe_ids)
        checked += 1
    assert checked == len(frame) > 100


EDGES = [0, 1, 4, 32]  # rank groups: the top-1, ranks 2-4, 5-32, the rest


def rank_groups(out: Path, model: str, corpus: str, temperature: float):
    """Observed and expected draws per rank group (EDGES) of the teacher at `temperature` in
    float64, over every row; each draw's log-probability is checked on the way."""
    arrays = results.load_arrays(out)
    frame = results.input_frame(corpus, "doc_id").set_index("id")
    _, tok = load(model)
    observed, expected, cache = np.zeros(4), np.zeros(4), {}
    for i, (row_id, position) in enumerate(zip(arrays["id"], arrays["position"], strict=True)):
        if row_id not in cache:
            ids = tok(frame.loc[row_id]["text"], truncation=True, max_length=32)["input_ids"]
            cache[row_id] = (float64_logits(model, ids) / temperature).log_softmax(-1)
        logp = cache[row_id][position]
        order = torch.argsort(logp, descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        drawn = arrays["sample_ids"][i].astype(np.int64)
        np.testing.assert_allclose(arrays["sample_logprobs"][i], logp[drawn].numpy(), atol=1e-4)
        groups = np.searchsorted(EDGES, rank[drawn].numpy(), side="right") - 1
        observed += np.bincount(groups, minlength=4)
        bounds = zip(EDGES, [*EDGES[1:], None], strict=True)
        expected += len(drawn) * np.array([float(logp[order[a:b]].exp().sum()) for a, b in bounds])
    return observed, expected


def test_samples_follow_the_teacher_not_its_top_k(peaked_dir, rows, tmp_path):
    """Grouped by the teacher's own ranks, the drawn ids match the float64 distribution at each
    temperature by a chi-square test, which top-1 or top-k draws fail."""
    for temperature in (1.0, 2.0):
        out = tmp_path / f"t{temperature}"
        settings = ["output.samples=16", f"output.sample_temperature={temperature}"]
        run_job(peaked_dir, rows, out, *settings)
        observed, expected = rank_groups(out, peaked_dir, rows, temperature)
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert chi2 < 21.1, (temperature, observed, expected)  # 3 degrees of freedom, p = 1e-4
        assert observed[3] > 30 and expected[3] > 30  # draws beyond any top-32
        top1_only = np.array([observed.sum(), 0, 0, 0])
        assert float(((top1_only - expected) ** 2 / expected).sum()) > 1000


def test_samples_do_not_depend_on_batching_or_process(model_dirs, rows, tmp_path):
    base = ["output.samples=6", "output.seed=3", "output.shard_rows=5"]
    run_job(model_dirs["gpt2"], rows, tmp_path / "a", *base, "batching.max_tokens=48")
    run_job(model_dirs["gpt2"], rows, tmp_path / "b", *base, "batching.max_tokens=4096")
    run_job(model_dirs["gpt2"], rows, tmp_path / "c", *base[:1], "output.seed=4")
    a, b, c = (results.load_arrays(tmp_path / name) for name in "abc")
    assert np.array_equal(a["sample_ids"], b["sample_ids"])
    assert np.array_equal(a["position"], b["position"])
    assert (a["sample_ids"] != c["sample_ids"]).mean() > 0.9  # another seed, other draws


def test_samples_after_a_kill_equal_an_uninterrupted_run(launcher, model_dirs, rows, tmp_path):
    settings = ["output.samples=4", "output.probes=[]", "output.shard_rows=5", "runtime.threads=1"]
    run_job(model_dirs["gpt2"], rows, tmp_path / "reference", *settings)
    out = tmp_path / "out"
    args = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={rows}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "output.k=4",
        "input.max_length=32",
        "output.report=false",
        *settings,
    ]
    killed = launcher.start(args, {"LOGIT_EXTRACT_CRASH_AT": "before_rename:3"}).wait()
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert launcher.start(args).wait().code == 0
    for name in ("sample_ids", "sample_logprobs", "position"):
        assert np.array_equal(
            results.load_arrays(out)[name], results.load_arrays(tmp_path / "reference")[name]
        )


def test_uniforms_are_uniform_and_keys_distinct():
    keys = sampling.position_keys(torch.zeros(50_000, dtype=torch.int64), torch.arange(50_000))
    assert len(torch.unique(keys)) == 50_000
    u = sampling.uniforms(keys, 4).flatten().numpy()
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = len(u) / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60  # 19 dof, p < 1e-5
    import pyarrow as pa

    ints = sampling.row_keys(pa.array([0, 1, 2], pa.int64()), seed=0)
    strings = sampling.row_keys(pa.array(["a", "b", "c"]), seed=0)
    assert len({*ints.tolist(), *strings.tolist()}) == 6
    assert not np.array_equal(ints, sampling.row_keys(pa.array([0, 1, 2], pa.int64()), seed=1))


def test_draw_matches_a_multinomial_on_one_distribution():
    """300 entries: four whole blocks of 64 and a partial one; a zero weight is never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 2
    logits[0, 7] = logits[0, 299] = -float("inf")
    weights = (logits - logits.max()).exp()  # unnormalized: draw normalizes by the total
    keys = sampling.position_keys(torch.zeros(1, dtype=torch.int64), torch.zeros(1))
    before = weights.clone()
    ids, total = sampling.draw(weights, keys, 4096)
    assert torch.equal(weights, before)  # the caller's probabilities are left as they are
    assert float(total) == pytest.approx(float(weights.double().sum()), rel=1e-6)
    assert 7 not in ids.tolist() and 299 not in ids.tolist()
    p = logits.double().softmax(-1)[0]
    counts = torch.bincount(ids[0], minlength=300).double()
    frequent = torch.argsort(p, descending=True)[:5]
    sigma = (4096 * p[frequent] * (1 - p[frequent])).sqrt()
    assert ((counts[frequent] - 4096 * p[frequent]).abs() < 4.5 * sigma).all()
    assert counts[256:299].sum() > 0  # the partial block is drawn from too
    # The same keys draw the same ids; a chunk boundary (64 samples) changes nothing.
    assert torch.equal(sampling.draw(weights, keys, 4096)[0], ids)
    assert torch.equal(sampling.draw(weights, keys, 100)[0], ids[:, :100])


def test_probe_that_is_not_one_token_is_refused(model_dirs, rows, tmp_path, capsys):
    args = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={rows}",
        f"output.dir={tmp_path / 'out'}",
        "output.probes=['zzzqqqxxx']",
    ]
    assert extract.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key output.probes: 'zzzqqqxxx' is ")
    assert "not one" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_teacher_keys_are_validated_and_change_the_fingerprint():
    base = ["model.path=m", "input.path=i", "output.dir=o"]
    model = {"identity": {}, "files": []}

    def print_of(*extra: str) -> str:
        return fingerprint(load_config(None, [*base, *extra]), [], model)

    default = print_of()
    # Unset keys leave the fingerprint of outputs written before they existed.
    assert print_of("output.probes=[]", "output.samples=0", "output.seed=9") == default
    changed = {
        print_of("output.probes=[' yes']"),
        print_of("output.probes=[' no']"),
        print_of("output.temperatures=[2]"),
        print_of("output.samples=4"),
        print_of("output.samples=4", "output.seed=1"),
        print_of("output.samples=4", "output.sample_temperature=2"),
        default,
    }
    assert len(changed) == 7
    for bad, message in (
        ("output.temperatures=[0]", "must be a finite number above 0, got 0.0"),
        ("output.temperatures=[.inf]", "must be a finite number above 0, got inf"),
        ("output.samples=-1", "must be 0 to"),
        ("output.probes=[a, a]", "listed twice"),
        ("output.seed=-1", "must be 0 to"),
    ):
        with pytest.raises(Exception, match=message):
            load_config(None, [*base, bad])
    with pytest.raises(Exception, match="output.level=documents has none"):
        load_config(None, [*base, "output.samples=2", "output.level=documents"])


def test_reduce_spec_and_probe_ids(model_dirs):
    _, tok = load(model_dirs["gpt2"])
    probe = single_tokens(model_dirs["gpt2"], 1)
    ids = reduce.probe_ids(tok, probe)
    assert ids == tuple(tok(probe[0], add_special_tokens=False)["input_ids"])
    config = load_config(None, ["model.path=m", "input.path=i", "output.dir=o", "output.samples=3"])
    spec = reduce.spec_for(config.output, ids)
    assert spec.teacher and spec.samples == 3 and spec.probes == ids
    assert not reduce.spec_for(
        load_config(None, ["model.path=m", "input.path=i", "output.dir=o"]).output
    ).teacher


def test_sampled_kl_converges_to_the_full_vocabulary_kl(peaked_dir, rows, tmp_path):
    """The README's sampled estimate, mean(sample_logprobs - log q(sample_ids)), is unbiased
    for KL(p || q): over every row its mean lies within 4 standard errors of the exact KL from
    the teacher's full logits, and its error shrinks as the samples grow."""
    out = tmp_path / "out"
    run_job(
        peaked_dir,
        rows,
        out,
        "output.logits=full",
        "output.dtype=float32",
        "output.samples=256",
        "input.max_length=12",
    )
    t = results.to_torch(out)
    p = t["logits"].double().log_softmax(-1)
    torch.manual_seed(1)
    q = (p.exp() * 0.5 + torch.rand_like(p).softmax(-1) * 0.5).log()  # a student near p
    exact = (p.exp() * (p - q)).sum(-1)
    terms = t["sample_logprobs"].double() - q.gather(1, t["sample_ids"])
    estimate = terms.mean(-1)
    standard_error = (terms.var(-1) / terms.shape[1]).sum().sqrt() / len(exact)
    assert abs(float(estimate.mean() - exact.mean())) < 4 * float(standard_error)
    assert float(exact.mean()) > 20 * float(standard_error)  # a KL the test can tell from 0
    error = {s: float((terms[:, :s].mean(-1) - exact).pow(2).mean().sqrt()) for s in (4, 64, 256)}
    assert error[256] < error[64] < error[4] / 2, error
