"""Data: ingest formats, long-tailed splits, image decoding, feature loading."""
