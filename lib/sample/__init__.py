"""Offline sample data, apart from the library's core (nothing in it imports this package).

- `generated`: text from a seeded syllable grammar and tiny random-weight models trained on
  nothing, for the tests and the benchmark;
- `docstrings`: a corpus of the Python standard library's own docstrings, on every machine;
- `train`: the script that trained the sample models on it, once (`python -m lib.sample.train`);
  their weights ship in `lib/sample/models/`;
- `default`: what `make extract` builds: the held-out docstring corpus and the trained models.
"""

from lib.sample.default import build_default_sample
from lib.sample.generated import (
    build_causal,
    build_peaked_causal,
    build_t5,
    generate_texts,
    write_corpus,
)

__all__ = [
    "build_causal",
    "build_default_sample",
    "build_peaked_causal",
    "build_t5",
    "generate_texts",
    "write_corpus",
]
