"""Versioned Lance feature store (no torch in this package)."""
from featurelt.store.core import (Commit, Store, StoreError, Transaction, command_line, open_store, rejects_table,
                                  utcnow)
from featurelt.store.schema import SchemaError, arrow_schema, conform
from featurelt.store.sql import ReadOnlyError

__all__ = ["Store", "Transaction", "Commit", "StoreError", "SchemaError", "ReadOnlyError", "open_store",
           "arrow_schema", "conform", "utcnow", "command_line", "rejects_table"]
