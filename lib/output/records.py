"""The JSON records of an output directory as dataclasses: a unit's record
(`_units/part-00042.json`) and the manifest (`_manifest.json`).

`to_json` writes them as they always were; `from_json` reads them back and raises ValueError
naming the first key that is missing or of the wrong type, so a damaged record is one line,
never a KeyError deep in a reader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from lib.config import JobConfig, from_record


def _field(data: dict, key: str, kind: type | tuple[type, ...], optional: bool = False):
    """`data[key]` checked against `kind` (ints are not bools); ValueError naming the key."""
    value = data.get(key)
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _kinds(kind))
    if not ok:
        raise ValueError(f"has no valid {key!r}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _number(data: dict, key: str, optional: bool = False) -> float | None:
    return _field(data, key, (int, float), optional)


@dataclass
class ShardEntry:
    """A committed shard: its path relative to OUT, rows, bytes and sha256; the ETag S3 gave
    its object; in the manifest, the rank that wrote it."""

    file: str
    rows: int
    bytes: int
    sha256: str
    etag: str | None = None
    rank: int | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: object) -> ShardEntry:
        if not isinstance(data, dict):
            raise ValueError(f"has a malformed shard entry {data!r}")
        try:
            return cls(
                _field(data, "file", str),
                _field(data, "rows", int),
                _field(data, "bytes", int),
                _field(data, "sha256", str),
                _field(data, "etag", str, optional=True),
                _field(data, "rank", int, optional=True),
            )
        except ValueError:
            raise ValueError(f"has a malformed shard entry {data!r}") from None


@dataclass(frozen=True)
class UnitSpan:
    """Which rows a unit covers: rows start..stop-1 of one input file."""

    index: int
    file: str
    start: int
    stop: int


@dataclass
class UnitRecord:
    """A committed unit: its shards, who committed it, its counts, lengths, batches, partial
    scores and skipped rows. Written before its shards become visible (lib/output/writer.py)."""

    fingerprint: str
    rank: int
    run_id: str
    unit: UnitSpan
    input_rows: int
    scored_rows: int
    skipped_rows: int
    truncated_rows: int
    tokens: int
    padded_tokens: int
    started_at: float
    committed_at: float
    lengths: dict  # kind ("text", "target") -> {"bin_width": w, "counts": [...]}
    batches: list[list[int]]  # [rows, tokens, padded tokens] of each forward pass
    scores: dict  # the unit's sums for the corpus scores (lib/extract/scores.py partial)
    skipped: list[list]  # [id, reason]
    topk_entries: int | None = None  # top-k entries stored (top-k token rows)
    topk_capped: int | None = None  # with output.top_p: positions that kept all k entries
    files: list[ShardEntry] = field(default_factory=list)

    def to_json(self) -> dict:
        data = {"files": [entry.to_json() for entry in self.files]}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "unit":
                data["unit"] = asdict(value)
            elif item.name != "files" and value is not None:
                data[item.name] = value
        return data

    @classmethod
    def from_json(cls, data: object) -> UnitRecord:
        """A record read back; ValueError for one that is damaged or of another version."""
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        unit = _field(data, "unit", dict)
        return cls(
            fingerprint=_field(data, "fingerprint", str),
            rank=_field(data, "rank", int),
            run_id=_field(data, "run_id", str),
            unit=UnitSpan(
                _field(unit, "index", int),
                _field(unit, "file", str),
                _field(unit, "start", int),
                _field(unit, "stop", int),
            ),
            input_rows=_field(data, "input_rows", int),
            scored_rows=_field(data, "scored_rows", int),
            skipped_rows=_field(data, "skipped_rows", int),
            truncated_rows=_field(data, "truncated_rows", int),
            tokens=_field(data, "tokens", int),
            padded_tokens=_field(data, "padded_tokens", int),
            started_at=_number(data, "started_at"),
            committed_at=_number(data, "committed_at"),
            lengths=_field(data, "lengths", dict),
            batches=_field(data, "batches", list),
            scores=_field(data, "scores", dict),
            skipped=_field(data, "skipped", list),
            topk_entries=_field(data, "topk_entries", int, optional=True),
            topk_capped=_field(data, "topk_capped", int, optional=True),
            files=[ShardEntry.from_json(entry) for entry in _field(data, "files", list)],
        )


@dataclass
class Totals:
    """Rows over the whole output."""

    input_rows: int
    scored_rows: int
    skipped_rows: int
    truncated_rows: int
    output_rows: int  # token rows (document rows at output.level=documents)
    document_rows: int | None = None  # at output.level documents or both
    topk_entries: int | None = None  # top-k entries stored, over every token row
    topk_capped: int | None = None  # with output.top_p: token rows that kept all k entries

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict) -> Totals:
        counts = [_field(data, key, int) for key in ("input_rows", "scored_rows")]
        counts += [_field(data, key, int) for key in ("skipped_rows", "truncated_rows")]
        return cls(
            *counts,
            _field(data, "output_rows", int),
            _field(data, "document_rows", int, optional=True),
            _field(data, "topk_entries", int, optional=True),
            _field(data, "topk_capped", int, optional=True),
        )


@dataclass
class Manifest:
    """A finished job's `_manifest.json`: what was run on what, what it wrote, its scores."""

    format_version: int
    fingerprint: str
    config: JobConfig
    model: dict  # the model's identity (lib/extract/models.py)
    schema: list[dict]  # the token shards' fields: name, type, nullable
    documents_schema: list[dict] | None  # the document shards', at output.level documents/both
    format: str
    world_size: int
    shards: list[ShardEntry]
    totals: Totals
    scores: dict  # the corpus scores (lib/extract/scores.py merge)
    throughput: dict  # this run's work and time
    recomputed: list[str]  # shards of units found damaged, missing or unrecorded, recomputed
    exported_from: str | None = None  # an export's source output (`logit-extract export`)

    def to_json(self) -> dict:
        data = {
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "model": self.model,
            "schema": self.schema,
        }
        if self.documents_schema is not None:
            data["documents_schema"] = self.documents_schema
        return (
            data
            | {
                "format": self.format,
                "world_size": self.world_size,
                "shards": [entry.to_json() for entry in self.shards],
                "totals": self.totals.to_json(),
                "scores": self.scores,
                "throughput": self.throughput,
                "recomputed": self.recomputed,
            }
            | ({"exported_from": self.exported_from} if self.exported_from else {})
        )

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """A manifest read back; ValueError naming the first key missing or malformed."""
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        config = from_record(_field(data, "config", dict))
        if config is None:
            raise ValueError("has no valid 'config'")
        fmt = _field(data, "format", str)
        if fmt not in ("parquet", "arrow"):
            raise ValueError(f"names an unknown format {fmt!r}")
        return cls(
            format_version=_field(data, "format_version", int),
            fingerprint=_field(data, "fingerprint", str),
            config=config,
            model=_field(data, "model", dict),
            schema=_field(data, "schema", list),
            documents_schema=_field(data, "documents_schema", list, optional=True),
            format=fmt,
            world_size=_field(data, "world_size", int),
            shards=[ShardEntry.from_json(entry) for entry in _field(data, "shards", list)],
            totals=Totals.from_json(_field(data, "totals", dict)),
            scores=_field(data, "scores", dict),
            throughput=_field(data, "throughput", dict),
            recomputed=_field(data, "recomputed", list),
            exported_from=_field(data, "exported_from", str, optional=True),
        )
