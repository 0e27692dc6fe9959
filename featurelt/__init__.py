"""featurelt: a feature-store-centric embedding pipeline for long-tailed image recognition.

Frozen encoders write embeddings into a versioned Lance store; light heads train from the cached
features; DuckDB answers SQL over embeddings, runs and predictions.
"""
from featurelt.store import Store, StoreError, open_store

__version__ = "0.1.0"
__all__ = ["Store", "StoreError", "open_store", "__version__"]
