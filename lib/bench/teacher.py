"""The teacher part: what each teacher column (output.probes, temperatures, samples) costs the
job, in time and bytes, against the same job without it."""

from __future__ import annotations

from pathlib import Path

from lib.bench.runs import job_config, job_process_seconds, show, took
from lib.bench.workloads import ModelSpec, build_model, write_corpora
from lib.output import layout

# (name, output keys) of each run; "none" is the baseline every other is divided by.
SETTINGS = (
    ("none", {}),
    ("probes=2", {"probes": ["probe-a", "probe-b"]}),
    ("temperatures=2", {"temperatures": [0.5, 2.0]}),
    ("samples=12", {"samples": 12}),
    ("samples=64", {"samples": 64}),
    ("all", {"probes": ["probe-a", "probe-b"], "temperatures": [0.5, 2.0], "samples": 12}),
)


def _shard_bytes(out: str) -> int:
    return sum(p.stat().st_size for p in layout.shard_files(Path(out)))


def teacher_part(specs: list[ModelSpec], root: Path, training_texts: list[str], args) -> list:
    """The job's wall time (its manifest's, start-up excluded) and bytes per position of each
    setting, each run a fresh process (in one long-lived process later runs ran up to half
    slower), best of two rounds in alternating order, on the causal model and 3N rows."""
    spec = next(s for s in specs if s.mode == "causal")
    corpus = write_corpora(root / "corpus-teacher", "lognormal", {"3N": 3 * args.rows})["3N"]
    with took(f"teacher {spec.name}"):
        model = build_model(spec, root / "models", training_texts)
        # The probes must be one token each: take two of the tokenizer's own pieces.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        pieces = [tok.decode([i]) for i in range(300, 400)]
        probes = [p for p in pieces if len(tok(p, add_special_tokens=False)["input_ids"]) == 1]
        seconds: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
        positions, sizes = 0, {}
        rounds = 1 if args.quick else 2
        for round_ in range(rounds):
            order = SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]
            for name, keys in order:
                out = str(root / f"out-teacher-{name}")
                config = job_config(model, corpus, out, args)
                for key, value in keys.items():
                    setattr(config.output, key, probes[:2] if key == "probes" else value)
                _, manifest = job_process_seconds(config, args)
                seconds[name].append(manifest.throughput["wall_s"])
                positions = manifest.totals.output_rows
                sizes[name] = _shard_bytes(out)
    base = min(seconds["none"])
    rows = []
    for name, _ in SETTINGS:
        best = min(seconds[name])
        rows.append(
            {
                "setting": name,
                "model": spec.name,
                "seconds": round(best, 2),
                "time_vs_none": round(best / base, 3),
                "bytes_per_position": round(sizes[name] / positions, 1),
                "added_bytes_per_position": round((sizes[name] - sizes["none"]) / positions, 1),
            }
        )
        show("teacher", rows[-1])
    return rows
