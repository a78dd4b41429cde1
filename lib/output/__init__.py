"""From per-position statistics to a committed output: rows, shards, records, manifest."""
