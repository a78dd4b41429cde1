"""Build the offline sample (generated corpus, tiny random T5 and GPT-2):
`python -m jobs.make_sample [DIR]`."""

from __future__ import annotations

import sys

from lib.sample import build_default_sample


def main(argv: list[str] | None = None) -> int:
    """Build the offline sample corpus and tiny models; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    info = build_default_sample(argv[0] if argv else "data/sample")
    print(
        f"sample corpus {info['corpus']}, model {info['model']}, "
        f"causal model {info['causal_model']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
