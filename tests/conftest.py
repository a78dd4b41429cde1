"""Session fixtures: tiny models and corpora built once, offline, from generated text."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib import sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Jobs draw no report at their end (a second or two a run); tests/test_report.py draws its own.
os.environ.setdefault("LOGIT_EXTRACT_NO_REPORT", "1")
# One commit thread, as on 2 cores, whatever this machine has: kill tests count the files a
# kill leaves. tests/test_resume.py runs one job on four.
os.environ.setdefault("LOGIT_EXTRACT_COMMIT_WORKERS", "1")

# Valid but awkward texts: the job must score all of them (and truncate the long one).
AWKWARD = [
    "",
    "   ",
    "Ünïcödé façade — naïve café",
    "日本語のテキストと中文文本",
    "emoji 🤖🚀✨ mixed in",
    "x",
    " ".join(sample.generate_texts(40, seed=99)),  # far beyond max_length
]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return sample.generate_texts(300, seed=7, mean_words=12)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, texts) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "t5": str(
            sample.build_t5(root / "t5", texts, d_model=32, num_layers=2, vocab_size=300, seed=1)
        ),
        "gpt2": str(
            sample.build_causal(root / "gpt2", texts, "gpt2", d_model=32, vocab_size=300, seed=2)
        ),
        "llama": str(
            sample.build_causal(root / "llama", texts, "llama", d_model=32, vocab_size=300, seed=3)
        ),
    }


@pytest.fixture(scope="session")
def peaked_dir(tmp_path_factory, texts) -> str:
    """A 32k-vocabulary GPT-2 with peaked, frequency-skewed distributions (a trained model's
    shape; see lib.sample.build_peaked_causal), for the top-k storage tests."""
    root = tmp_path_factory.mktemp("peaked")
    return str(
        sample.build_peaked_causal(root, texts, d_model=16, num_layers=1, vocab_size=300, seed=4)
    )


def write_rows(path, texts: list, targets: list | None = None, ids: list | None = None) -> str:
    """Write a small Parquet corpus with `text` (and `target`, `doc_id`) columns."""
    columns = {"text": pa.array(texts, pa.string())}
    if targets is not None:
        columns["target"] = pa.array(targets, pa.string())
    if ids is not None:
        columns["doc_id"] = pa.array(ids)
    pq.write_table(pa.table(columns), path, row_group_size=7)
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, texts) -> str:
    """60 generated rows plus the awkward ones, with targets and string ids, in two files."""
    root = tmp_path_factory.mktemp("corpus")
    body = sample.generate_texts(60, seed=11, mean_words=10) + AWKWARD
    targets = sample.generate_texts(len(body), seed=12, mean_words=5)
    ids = [f"row-{i:03d}" for i in range(len(body))]
    half = len(body) // 2
    write_rows(root / "a.parquet", body[:half], targets[:half], ids[:half])
    write_rows(root / "b.parquet", body[half:], targets[half:], ids[half:])
    return str(root)


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    """Starts `python -m jobs.extract` runs as children of one fork server (tests/launcher.py)."""
    from tests.launcher import Launcher

    launcher = Launcher(tmp_path_factory.mktemp("runs"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-compatible server (moto, with authentication), for the session."""
    from tests.s3server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server's credentials and endpoint in this process's environment, as a user sets them;
    clients made before are dropped so that each test's environment is the one in force."""
    from lib import storage
    from lib.storage import s3 as lib_s3

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.filesystem.cache_clear()
    lib_s3.forget_clients()
    yield s3_server
    storage.filesystem.cache_clear()
    lib_s3.forget_clients()
