"""What extraction embeds: set names, split check, rows already in a set, the todo list (incremental, resumable)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurelt.store import Store, StoreError

if TYPE_CHECKING:
    from featurelt.encoders.base import Encoder


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def set_names(encoder: "Encoder", products: list[str], name: str | None) -> dict[str, str]:
    """Embedding set per product: ``--name`` for a single product, ``<name>_<product>`` for several."""
    if name is None:
        return {p: encoder.default_set_name(p) for p in products}
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    if len(products) == 1:
        return {products[0]: name}
    return {p: f"{name}_{p}" for p in products}


def split_filter(split: str | None) -> str | None:
    return None if split is None else f"split = {sql_str(split)}"


def check_split(store: Store, split: str | None) -> None:
    if not store.has_table("samples"):
        raise StoreError(f"store {store.root} has no samples table; run `featurelt ingest` first")
    if split is None:
        if store.count("samples") == 0:
            raise ValueError(f"store {store.root} has no samples")
        return
    if store.count("samples", split_filter(split)) == 0:
        splits = sorted(set(store.read("samples", columns=["split"]).column("split").to_pylist()))
        raise ValueError(f"no samples with split '{split}' in store {store.root}; splits present: "
                         f"{', '.join(splits) or '(none)'}")


def done_views(store: Store, table: str, fingerprint: str,
               duplicates: set[tuple[str, int]] | None = None) -> dict[str, set[int]]:
    """``{sample_id: {views}}`` of the rows of ``table`` made with ``fingerprint`` (reads 2 columns).
    ``duplicates``: filled with the ``(sample_id, view)`` pairs that have more than one row."""
    if not store.has_table(table):
        return {}
    done: dict[str, set[int]] = {}
    for b in store.scan(table, columns=["sample_id", "view"], filter=f"fingerprint = {sql_str(fingerprint)}"):
        for sid, view in zip(b.column("sample_id").to_pylist(), b.column("view").to_pylist()):
            have = done.setdefault(sid, set())
            if duplicates is not None and view in have:
                duplicates.add((sid, view))
            have.add(view)
    return done


def remove_duplicates(store: Store, table: str, fingerprint: str, message: str) -> int:
    """Delete the surplus copies of ``(sample_id, view)`` rows made with ``fingerprint`` (left by two
    runs of the same extract at once before each chunk re-checked the table), keeping the first
    copy of each, in one transaction that looks again after taking the store lock. Returns the rows removed."""
    with store.transaction(message) as tx:
        dups: set[tuple[str, int]] = set()
        done_views(store, table, fingerprint, dups)
        if not dups:
            tx.discard()
            return 0
        ids = ", ".join(sql_str(s) for s in sorted({sid for sid, _ in dups}))
        where = f"fingerprint = {sql_str(fingerprint)} AND sample_id IN ({ids})"
        rows = store.read(table, filter=where)
        seen: set[tuple[str, int]] = set()
        keep = []
        for i, key in enumerate(zip(rows.column("sample_id").to_pylist(), rows.column("view").to_pylist())):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        tx.delete(table, where)
        tx.append(table, rows.take(keep))
    return rows.num_rows - len(keep)


@dataclass
class Plan:
    """The work of a run: positions of the samples to read and the views each one needs."""

    positions: np.ndarray  # int64 row positions in the samples dataset (pinned version)
    needed: list[tuple[int, ...]]  # views to compute per position
    skipped: int  # samples in range whose every view is present for every product
    samples_version: int  # Lance version of `samples` that the positions refer to


def plan_todo(store: Store, *, split: str | None, limit: int | None, views: int,
          done: dict[str, dict[str, set[int]]]) -> Plan:
    """Scan ``sample_id, split`` of the samples table and list what is left to embed."""
    want = set(range(views + 1))
    interned: dict[tuple[int, ...], tuple[int, ...]] = {}
    positions: list[int] = []
    needed: list[tuple[int, ...]] = []
    skipped = 0
    seen = 0
    offset = 0
    ds = store.dataset("samples")
    for b in ds.to_batches(columns=["sample_id", "split"], batch_size=65536):
        sids = b.column("sample_id").to_pylist()
        splits = b.column("split").to_pylist() if split is not None else None
        for i, sid in enumerate(sids):
            if splits is not None and splits[i] != split:
                continue
            if limit is not None and seen >= limit:
                break
            seen += 1
            missing = set()
            for views_done in done.values():
                missing |= want - views_done.get(sid, set())
            if missing:
                key = tuple(sorted(missing))
                positions.append(offset + i)
                needed.append(interned.setdefault(key, key))  # one tuple object per distinct view set
            else:
                skipped += 1
        offset += b.num_rows
        if limit is not None and seen >= limit:
            break
    return Plan(np.asarray(positions, dtype=np.int64), needed, skipped, ds.version)
