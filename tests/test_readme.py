"""The examples of README.md and docs/*.md run as written, on outputs of the job they describe.

Each ```python block of those pages is found by a phrase it contains and run in a folder where
its paths (`out/default`, `out/scored`, `out/teacher`, `my-student`) lead to real outputs of
tiny models. A block edited so that it no longer runs, or no longer computes what it says,
fails here; so does a block that no test runs. Every shell line that runs the job loads as a
config, and the verify and report lines run.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import extract
from lib import cli, results, sample
from lib.output import layout
from tests.conftest import write_rows
from tests.test_teacher import single_tokens

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
# (page, source) of every ```python block, in page order
BLOCKS = [
    (name, source)
    for name, text in TEXTS.items()
    for source in re.findall(r"```python\n(.*?)```", text, re.S)
]
SHELL = [
    source for text in TEXTS.values() for source in re.findall(r"```bash\n(.*?)```", text, re.S)
]


def block(phrase: str) -> tuple[str, str]:
    """The one python block (page, source) of the README and docs that contains `phrase`."""
    found = [(name, source) for name, source in BLOCKS if phrase in source]
    assert len(found) == 1, f"{len(found)} python blocks in README.md and docs/ contain {phrase!r}"
    return found[0]


def run(found: tuple[str, str], namespace: dict) -> list:
    """Run a block like a notebook cell: returns the value of each bare expression, in order."""
    name, source = found
    values = []
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Expr):
            code = compile(ast.Expression(statement.value), name, "eval")
            values.append(eval(code, namespace))
        else:
            exec(compile(ast.Module([statement], []), name, "exec"), namespace)
    return values


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_dirs, peaked_dir) -> dict[str, Path]:
    """The outputs the examples read: the default config's run (T5, targets), a causal run with
    document scores, a second model's, and three teacher layouts (top-p on a model whose
    distributions are peaked enough for it to trim rows)."""
    root = tmp_path_factory.mktemp("readme")
    texts = sample.generate_texts(40, seed=51, mean_words=9)
    causal = write_rows(root / "texts.parquet", texts)
    targets = sample.generate_texts(40, seed=52, mean_words=4)
    ids = [f"doc-{i}" for i in range(40)]
    corpus = write_rows(root / "corpus.parquet", texts, targets, ids)  # as data/sample's
    runs = {
        "default": [
            "--config",
            str(ROOT / "configs" / "default.yaml"),
            f"model.path={model_dirs['t5']}",
            f"input.path={corpus}",
            "input.max_length=24",
        ],
        "scored": [f"model.path={model_dirs['gpt2']}", "output.level=both"],
        "model-b": [f"model.path={model_dirs['llama']}", "output.level=documents"],
        "teacher": [f"model.path={model_dirs['gpt2']}", "output.k=8"],
        "teacher-top-p": [f"model.path={peaked_dir}", "output.top_p=0.95"],
        "teacher-examples": [f"model.path={model_dirs['gpt2']}", "output.rows=examples"],
        "chat": [
            f"model.path={model_dirs['gpt2']}",
            "output.temperatures=[2.0]",
            "output.samples=12",
            "output.dtype=float32",
        ],
        "ask-llm": [
            f"model.path={model_dirs['t5']}",
            "decoder.mode=start",
            f"output.probes={json.dumps(single_tokens(model_dirs['t5'], 2))}",
        ],
    }
    paths = {"corpus": Path(corpus)}
    for name, args in runs.items():
        paths[name] = root / name
        if name == "ask-llm":
            args = [*args, f"input.path={corpus}", "input.id_column=doc_id"]
        elif name != "default":
            args = [*args, f"input.path={causal}", "input.max_length=64"]
        assert extract.main([*args, f"output.dir={paths[name]}"]) == 0
    return paths


@pytest.fixture
def folder(tmp_path, monkeypatch, model_dirs):
    """A working directory for one block; `folder(out="...")` links its `out/NAME` folders."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "my-student").symlink_to(model_dirs["llama"])  # not the teacher
    (tmp_path / "out").mkdir()

    def link(**targets: Path) -> Path:
        for name, target in targets.items():
            (tmp_path / "out" / name.replace("_", "-")).symlink_to(target)
        return tmp_path

    return link


def test_quick_start_and_every_client(outputs, folder):
    folder(default=outputs["default"])
    expected = results.load_table(outputs["default"]).num_rows
    namespace: dict = {}
    (head,) = run(block("df.head()"), namespace)
    assert len(namespace["df"]) == expected and len(head) == 5
    assert {"id", "position", "topk_ids", "topk_logits", "logsumexp"} <= set(head.columns)

    namespace = {}
    duck, polars, hf = run(block("duckdb.sql("), namespace)
    assert namespace["table"].num_rows == expected
    means = namespace["df"].groupby("id").token_logprob.mean()
    assert len(duck.fetchall()) == len(means)
    assert sorted(polars.collect()["id"].to_list()) == sorted(means.index)
    assert hf.num_rows == expected


def test_pandas_examples_compute_what_they_say(outputs, folder):
    folder(default=outputs["default"])
    exact, per_example, perplexity = run(block("mean log-likelihood per example"), {})
    arrays = results.load_arrays(outputs["default"])
    first = np.argmax((arrays["id"] == arrays["id"][0]) & (arrays["position"] == 0))
    np.testing.assert_allclose(exact, arrays["topk_logprobs"][first], atol=1e-6)
    assert (np.diff(exact) <= 0).all() and exact[0] <= 0
    frame = results.load_frame(outputs["default"])
    assert per_example.to_dict() == frame.groupby("id").token_logprob.mean().to_dict()
    manifest = json.loads((outputs["default"] / "_manifest.json").read_text())
    assert math.isclose(perplexity, manifest["scores"]["perplexity"], rel_tol=1e-5)

    namespace: dict = {}
    run(block("results.join_input"), namespace)
    assert namespace["arrays"]["topk_logprobs"].shape == (len(frame), 20)  # default.yaml: k 20
    assert len(namespace["tensors"]["logsumexp"]) == len(frame)
    assert namespace["example_id"] in set(frame.id)
    assert "text" in namespace["joined"].columns and len(namespace["joined"]) == len(frame)


@pytest.mark.parametrize(
    "teacher,phrase", [("teacher", "kl = (teacher_logprobs"), ("teacher-top-p", "kept =")]
)
def test_top_k_kl_against_a_student(outputs, folder, teacher, phrase):
    folder(teacher=outputs[teacher])
    t = results.to_torch(outputs[teacher])
    manifest = json.loads((outputs[teacher] / "_manifest.json").read_text())
    rows, vocab = len(t["logsumexp"]), manifest["model"]["vocab_size"]
    torch.manual_seed(0)
    namespace = {"results": results, "torch": torch, "student_logits": torch.randn(rows, vocab)}
    run(block(phrase), namespace)
    kl = namespace["kl"]
    assert kl.shape == (rows,) and torch.isfinite(kl).all()
    # The same KL as a loop over each row's kept entries in float64.
    row = int(torch.argmax((t["topk_ids"] >= 0).sum(-1)))
    kept = t["topk_ids"][row] >= 0
    teacher_lp = t["topk_logprobs"][row][kept].double()
    student_lp = namespace["student_logits"][row].double().log_softmax(-1)[t["topk_ids"][row][kept]]
    assert math.isclose(
        float(kl[row]), float((teacher_lp.exp() * (teacher_lp - student_lp)).sum()), rel_tol=1e-4
    )
    if teacher == "teacher-top-p":
        assert not (t["topk_ids"] >= 0).all()  # top_p trims rows, so the mask matters


def test_teacher_losses_at_a_temperature_and_from_samples(outputs, folder):
    folder(chat=outputs["chat"])
    t = results.to_torch(outputs["chat"])
    manifest = json.loads((outputs["chat"] / "_manifest.json").read_text())
    rows, vocab = len(t["logsumexp"]), manifest["model"]["vocab_size"]
    torch.manual_seed(0)
    namespace = {"student_logits": torch.randn(rows, vocab)}
    run(block("kl_sampled"), namespace)
    kl_topk, kl_sampled, loss = namespace["kl_topk"], namespace["kl_sampled"], namespace["loss"]
    assert kl_topk.shape == kl_sampled.shape == loss.shape == (rows,)
    # The top-k KL at T = 2, as a float64 loop over one row's entries.
    row = 3
    teacher = (t["topk_logits"][row].double() / 2 - t["logsumexp_t"][row, 0].double()).exp()
    student = (namespace["student_logits"][row].double() / 2).log_softmax(-1)[t["topk_ids"][row]]
    exact = float((teacher * (teacher.log() - student)).sum() * 4)
    assert math.isclose(float(kl_topk[row]), exact, rel_tol=1e-4)
    # Each sampled term is log p(x) - log q(x) at the drawn ids.
    student = namespace["student_logits"][row].log_softmax(-1)[t["sample_ids"][row]]
    assert math.isclose(
        float(kl_sampled[row]), float((t["sample_logprobs"][row] - student).mean()), rel_tol=1e-5
    )
    assert (loss > 0).all()


def test_ask_llm_score(outputs, folder):
    folder(ask_llm=outputs["ask-llm"])
    namespace: dict = {}
    run(block("p_yes"), namespace)
    p_yes = namespace["p_yes"]
    assert p_yes.shape == (len(results.load_arrays(outputs["ask-llm"])["id"]),)
    assert ((p_yes > 0) & (p_yes < 1)).all() and p_yes.std() > 0


def test_document_score_examples(outputs, folder):
    folder(scored=outputs["scored"], model_a=outputs["scored"], model_b=outputs["model-b"])
    namespace: dict = {}
    (differences,) = run(block("results.load_documents("), namespace)
    docs = namespace["docs"]
    assert len(docs) == 40 and docs.perplexity.notna().sum() > 30
    assert 0 < len(namespace["keep"]) < len(docs)
    assert list(namespace["suspects"].columns) == ["id", "min_k_plus_plus", "n_tokens"]
    assert len(namespace["suspects"]) == 20
    # the highest Min-K%++ scores: members of the training data score high (Zhang et al.)
    top = docs.min_k_plus_plus.sort_values(ascending=False).iloc[:20]
    assert sorted(namespace["suspects"].min_k_plus_plus) == sorted(top)
    assert namespace["arrays"]["perplexity"].dtype == np.float64
    assert differences["count"] == namespace["whole"].sum() > 30


def test_distillation_loop(outputs, folder):
    folder(teacher=outputs["teacher-examples"])
    namespace: dict = {}
    run(block("to_hf_dataset("), namespace)
    assert len(namespace["data"]) == 40
    loss = namespace["loss"].item()  # a student that is not the teacher: a positive top-k KL
    assert math.isfinite(loss) and loss > 0


def test_every_block_is_run_here():
    phrases = [
        "df.head()",
        "duckdb.sql(",
        "mean log-likelihood per example",
        "results.join_input",
        "kl = (teacher_logprobs",
        "kept =",
        "results.load_documents(",
        "to_hf_dataset(",
        "kl_sampled",
        "p_yes",
    ]
    assert sorted(BLOCKS.index(block(p)) for p in phrases) == list(range(len(BLOCKS)))


def commands(*programs: str) -> list[list[str]]:
    """The arguments of every shell line of the README and docs that runs one of `programs`
    (`logit-extract verify`, `-m jobs.verify`, `make extract`, ...), continuation lines joined,
    comments and a closing quote dropped."""
    found = []
    for text in SHELL:
        for line in text.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#"):
                continue
            for program in programs:
                if program in line:
                    found.append(shlex.split(line.split(program, 1)[1].rstrip("'")))
                    break
    return found


def command_lines(name: str) -> list[list[str]]:
    """The arguments of every line that runs the `logit-extract` command `name`, whether as
    `logit-extract NAME` or as its alias `python -m jobs.NAME` (`accelerate launch -m ...`)."""
    return commands(f"logit-extract {name}", f"-m jobs.{name}")


def test_extract_command_lines_are_valid_configs(capsys):
    """Every `logit-extract extract`, `jobs.extract` and `make extract` line of the README and
    docs loads as a config (run from the repository, where its configs/ paths lead)."""
    lines = command_lines("extract")
    for make_args in commands("make extract"):
        settings = dict(arg.split("=", 1) for arg in make_args)
        lines.append(
            ["--config", settings.get("CONFIG", "configs/default.yaml")]
            + shlex.split(settings.get("ARGS", ""))
        )
    # quick start, your own data, make, configuration, one GPU, cluster, Slurm and S3 lines
    assert len(lines) >= 14
    for args in lines:
        assert cli.main(["extract", *args, "--print-config"]) == 0, (args, capsys.readouterr().err)


def test_bench_command_lines_parse():
    from lib.bench import command

    lines = commands("make bench")
    assert len(lines) >= 7
    parser = cli.Parser()
    command.add_arguments(parser)
    for args in lines:
        settings = dict(arg.split("=", 1) for arg in args)
        parser.parse_args(shlex.split(settings.get("ARGS", "")))
    for args in command_lines("bench"):
        parser.parse_args(args)


def test_report_and_verify_command_lines_run(outputs, folder, capsys):
    base = folder(default=outputs["default"])
    (base / "data" / "sample").mkdir(parents=True)
    (base / "data" / "sample" / "corpus.parquet").symlink_to(outputs["corpus"])
    (base / "docs").mkdir()
    lines = [args for args in command_lines("verify") if not args[0].startswith("s3://")]
    assert len(lines) == 4
    for args in lines:
        assert cli.main(["verify", *args]) == 0, (args, capsys.readouterr())
    lines = command_lines("report")
    assert len(lines) == 4
    for args in lines:
        assert cli.main(["report", *args]) == 0, (args, capsys.readouterr())
    assert (base / "out" / "default" / layout.REPORT).stat().st_size > 10_000
    assert (base / "run.html").stat().st_size > 10_000
    assert (base / "docs" / "report.png").stat().st_size > 10_000


def test_error_examples_print_what_the_docs_show(capsys):
    """Each `$ logit-extract extract ...` example followed by its `error: ...` line."""
    pattern = (
        r"^\$ (?:\.venv/bin/)?(?:logit-extract extract|python -m jobs\.extract) (.*)\n(error: .*)$"
    )
    examples = [found for text in TEXTS.values() for found in re.findall(pattern, text, re.M)]
    assert examples
    for args, line in examples:
        assert cli.main(["extract", *shlex.split(args)]) == 2
        assert capsys.readouterr().err.strip() == line
