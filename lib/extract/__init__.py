"""From a corpus to per-position statistics: read, tokenize, bucket, forward, reduce."""
