"""Versioned Lance feature store (no torch in this package)."""
from featurelt.store.core import (Commit, Store, StoreError, Transaction, command_line, open_store, rejects_table,
                                  utcnow)
from featurelt.store.schema import SchemaError, arrow_schema, conform
from featurelt.store.sql import ReadOnlyError, run_sql

# The SQL layer sits on top of core (sql imports core, never the reverse); Store.sql is wired here.
Store.sql = run_sql  # type: ignore[method-assign]

__all__ = ["Store", "Transaction", "Commit", "StoreError", "SchemaError", "ReadOnlyError", "open_store",
           "arrow_schema", "conform", "utcnow", "command_line", "rejects_table"]
