"""Table schemas: read ``schemas/<table>.json`` and validate data against them.

Each JSON file lists the fields of one table (name, Arrow type, nullable, description) and a
``schema_version``. Every write goes through :func:`conform`, which casts losslessly where it
can and otherwise refuses the write with a message naming the field (and the first bad row).
The embedding tables share one schema, ``embeddings.json``, parametrised by ``dtype`` and ``dim``.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
EMBEDDING_PREFIX = "emb_"

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "timestamp[us]": pa.timestamp("us"),
}


class SchemaError(ValueError):
    """Data does not match a table's schema; the message names the table and field."""


def parse_type(spec: str) -> pa.DataType:
    """Arrow type from a schema string: ``int32``, ``list<float32>``, ``fixed_size_list<float16>[512]``."""
    spec = spec.strip()
    if spec in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[spec]
    m = re.fullmatch(r"list<(.+)>", spec)
    if m:
        return pa.list_(parse_type(m.group(1)))
    m = re.fullmatch(r"fixed_size_list<(.+)>\[(\d+)\]", spec)
    if m:
        return pa.list_(parse_type(m.group(1)), int(m.group(2)))
    raise ValueError(f"unknown type '{spec}' in a schema file")


def table_kind(table: str) -> str:
    """The schema file a table uses: ``emb_<name>`` tables use ``embeddings``."""
    return "embeddings" if table.startswith(EMBEDDING_PREFIX) else table


@lru_cache(maxsize=None)
def schema_json(kind: str) -> dict[str, Any]:
    """The parsed ``schemas/<kind>.json``."""
    path = SCHEMA_DIR / f"{kind}.json"
    if not path.exists():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))
        raise KeyError(f"no schema for table '{kind}' ({path}); known: {', '.join(known)}")
    return json.loads(path.read_text())


def table_names() -> list[str]:
    """All schema kinds defined in ``schemas/``."""
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))


def arrow_schema(table: str, **params: Any) -> pa.Schema:
    """Arrow schema of ``table``. Embedding tables need ``dim=`` (and ``dtype=``, default float32)."""
    spec = schema_json(table_kind(table))
    fields = []
    for f in spec["fields"]:
        type_str = f["type"]
        if "{" in type_str:
            if table_kind(table) == "embeddings":
                params.setdefault("dtype", "float32")
                if params.get("dtype") not in ("float32", "float16"):
                    raise SchemaError(f"embedding dtype must be float32 or float16, got {params.get('dtype')!r}")
                if not isinstance(params.get("dim"), int) or params["dim"] <= 0:
                    raise SchemaError(f"table '{table}': embedding dim must be a positive int, got {params.get('dim')!r}")
            type_str = type_str.format(**params)
        fields.append(pa.field(f["name"], parse_type(type_str), nullable=f["nullable"],
                               metadata={"description": f["description"]}))
    meta = {"featurelt.table": table_kind(table), "featurelt.schema_version": str(spec["schema_version"])}
    return pa.schema(fields, metadata=meta)


def embedding_params(schema: pa.Schema) -> dict[str, Any]:
    """``{"dim": D, "dtype": "float32"|"float16"}`` of an existing embedding table's schema."""
    vtype = schema.field("vector").type
    dtype = {pa.float16(): "float16", pa.float32(): "float32"}.get(vtype.value_type)
    if dtype is None:
        raise SchemaError(f"embedding vector must be float16 or float32, got {vtype.value_type}")
    return {"dim": vtype.list_size, "dtype": dtype}


def conform(data: pa.Table | pa.RecordBatch, schema: pa.Schema, *, table: str) -> pa.RecordBatch | pa.Table:
    """Return ``data`` cast to ``schema`` (same column order), or raise :class:`SchemaError`.

    Casts are *safe* (no overflow or truncation). Missing, extra, uncastable and null-in-non-null
    fields are refused with the field name, the type that arrived and the first bad row.
    """
    names = list(data.schema.names)
    expected = [f.name for f in schema]
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing:
        raise SchemaError(f"table '{table}': missing field(s) {missing}; got fields {names}")
    if extra:
        raise SchemaError(f"table '{table}': unknown field(s) {extra}; schema fields are {expected}")
    columns = []
    for field in schema:
        col = data.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = pc.cast(col, field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SchemaError(
                    f"table '{table}': field '{field.name}' must be {field.type}, got {data.column(field.name).type}"
                    f" ({str(exc).splitlines()[0]})"
                ) from None
        if not field.nullable and col.null_count:
            first = pc.index(pc.is_null(col), True).as_py()
            raise SchemaError(
                f"table '{table}': field '{field.name}' may not be null; {col.null_count} null value(s), first at row {first}"
            )
        columns.append(col)
    if isinstance(data, pa.RecordBatch):
        return pa.RecordBatch.from_arrays(columns, schema=schema)
    return pa.Table.from_arrays(columns, schema=schema)
