"""What `make extract` reads (`logit-extract sample DIR`): the held-out docstring corpus and the
sample models trained on the other docstrings (lib/sample/train.py), copied from the package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lib.sample import docstrings

MODELS = Path(__file__).resolve().parent / "models"
# Raised whenever what the sample holds changes, so that an older sample is replaced, not kept.
VERSION = 2


def build_default_sample(root: str | Path) -> dict[str, str]:
    """The corpus `configs/default.yaml` scores (docstrings of modules the models never saw),
    the T5 it scores them with and the GPT-2 of `configs/causal-lm.yaml`; what exists stays."""
    root = Path(root)
    corpus = root / "corpus.parquet"
    model_dir, causal_dir = root / "t5-tiny", root / "gpt2-tiny"
    if _version(root / "sample.json") != VERSION:
        corpus.unlink(missing_ok=True)
        for old in (model_dir, causal_dir):
            shutil.rmtree(old, ignore_errors=True)
    if not corpus.exists():
        held_out = [doc for doc in docstrings.collect() if docstrings.held_out(doc.module)]
        docstrings.write_corpus(corpus, held_out)
    for source, target in ((MODELS / "t5", model_dir), (MODELS / "gpt2", causal_dir)):
        if not (target / "config.json").exists():
            shutil.copytree(source, target, dirs_exist_ok=True)
    info = {"corpus": str(corpus), "model": str(model_dir), "causal_model": str(causal_dir)}
    (root / "sample.json").write_text(json.dumps(info | {"version": VERSION}, indent=2) + "\n")
    return info


def _version(path: Path) -> int | None:
    """The version of the sample described by `path`, None for none or an unreadable one."""
    try:
        return json.loads(path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
