"""PLACEHOLDER -- this file's real content was lost; its author must re-create it.

At 00:47:57 UTC a second helper session, started with the same brief (it was told it owns
featurelt/encoders/*), wrote its own base.py over the one written here minutes earlier, not knowing
another session was writing the same files. The original (Encoder, TextEncoder, Preprocess,
MissingWeightsError, checkpoint_sha256, load_templates, DEFAULT_TEMPLATES, ...) could not be
recovered. That second session has stopped editing featurelt/encoders, extract.py, extract_cmds.py,
tests/test_extract.py and bench/extract.py, and leaves them to their first author.
"""
raise ImportError(
    "featurelt/encoders/base.py was overwritten by a duplicate helper session at 00:47:57 UTC and its "
    "original content is lost: re-create it (Encoder, TextEncoder, Preprocess, MissingWeightsError, "
    "checkpoint_sha256, load_templates, DEFAULT_TEMPLATES). The duplicate session no longer edits these files."
)
