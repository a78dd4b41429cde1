"""The summary printed at the end of a run, from hand-made manifests."""

from __future__ import annotations

from lib.config import load_config
from lib.inspect.summary import print_summary
from lib.output.records import Manifest, ShardEntry, Totals


def _manifest(mode: str, units: int, shards: int, perplexity: float) -> Manifest:
    config = load_config(None, ["model.path=m", "input.path=i", "output.dir=o"])
    config.decoder.mode = mode
    entry = ShardEntry("tokens/part-00000.parquet", 40, 1, "0" * 64)
    return Manifest(
        format_version=3,
        fingerprint="fp",
        config=config,
        model={},
        schema=[],
        documents_schema=None,
        format="parquet",
        world_size=1,
        shards=[entry] * shards,
        totals=Totals(3, 3, 0, 1, 40),
        recomputed=[],
        throughput={
            "rows": 3,
            "units": units,
            "tokens": 42,
            "padded_tokens": 48,
            "padding_efficiency": 0.875,
            "tokens_per_s": 1234.5,
            "rows_per_s": 88.2,
            "wall_s": 0.34,
        },
        scores={
            "tokens": 40,
            "perplexity": perplexity,
            "bits_per_byte": 1.25,
            "top1_accuracy": 0.5,
            "ece": 0.0421,
        },
    )


def _fields(capsys) -> dict[str, str]:
    lines = capsys.readouterr().out.splitlines()
    return {line[2:22].strip(): line[22:] for line in lines}


def test_counts_read_as_english_and_perplexity_as_a_number(capsys):
    print_summary(_manifest("targets", 1, 1, 1002.2), "out/x")
    fields = _fields(capsys)
    assert fields["output rows"] == "40 in 1 shard"
    assert fields["this run"] == "3 rows in 1 unit, 1 process"
    assert fields["scores"] == (
        "40 tokens scored: perplexity 1,002, 1.250 bits/byte, top-1 50.0%, ECE 0.042"
    )
    print_summary(_manifest("targets", 2, 2, 12.345), "out/x")
    fields = _fields(capsys)
    assert fields["output rows"] == "40 in 2 shards"
    assert fields["this run"] == "3 rows in 2 units, 1 process"
    assert fields["scores"].startswith("40 tokens scored: perplexity 12.3, ")


def test_generate_mode_has_no_accuracy_or_calibration(capsys):
    """The model scores its own greedy tokens: its top-1, unless its generation config steers
    decoding (BART's no_repeat_ngram_size), when the figures say something again."""
    manifest = _manifest("generate", 1, 1, 3.2)
    manifest.scores["top1_accuracy"] = 1.0
    print_summary(manifest, "out/x")
    assert _fields(capsys)["scores"] == "40 tokens scored: perplexity 3.2, 1.250 bits/byte"
    manifest.scores["top1_accuracy"] = 0.975
    print_summary(manifest, "out/x")
    assert _fields(capsys)["scores"].endswith(", top-1 97.5%, ECE 0.042")


def test_a_top_p_that_kept_all_k_entries_at_most_positions_says_so(capsys):
    """With output.top_p, positions that kept all k entries did not reach the mass: k decided
    what was stored. Said when that is most positions, with the share; not otherwise."""
    manifest = _manifest("targets", 1, 1, 3.2)
    manifest.config.output.top_p, manifest.config.output.k = 0.95, 20
    manifest.totals.topk_capped = 34  # of 40 token rows
    print_summary(manifest, "out/x")
    assert _fields(capsys)["top-p"] == (
        "85% of positions kept all 20 entries without reaching top_p=0.95: output.k caps it "
        "(raise output.k to store that mass)"
    )
    manifest.totals.topk_capped = 12
    print_summary(manifest, "out/x")
    assert "top-p" not in _fields(capsys)
