"""The local engine: the loader over the todo rows, one batch in flight, chunked commits in a background thread."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from featurelt.extract.batches import view_batches
from featurelt.extract.device import progress_bar
from featurelt.extract.encode import LoopTimes, encoded
from featurelt.extract.plan import Plan, done_views
from featurelt.extract.rows import drop_done, new_rows, rejects_rows
from featurelt.extract.views import ViewMaker
from featurelt.store import Store

if TYPE_CHECKING:
    from featurelt.encoders.base import Encoder


class LocalRun:
    """The local engine: a DataLoader over the plan, chunked commits.

    A chunk is committed in a background thread while the next one is encoded (Lance writes
    release the GIL; a chunk of 16,384 x 512 float32 rows takes about 0.22 s to write on cpu2, which
    a GPU would otherwise sit out). At most one commit is in flight, chunks commit in order, and an
    interrupted run waits for the commit in flight, so the store keeps every chunk handed over."""

    def __init__(self, store: Store, encoder: "Encoder", products: list[str], sets: dict[str, str],
                 fingerprints: dict[str, str], done: dict[str, dict[str, set[int]]], plan: Plan,
                 make_view: ViewMaker, *, dtype: str, views: int, batch_size: int, num_workers: int, device: str,
                 strict: bool, chunk_rows: int, commit_seconds: float, progress: bool, message: str) -> None:
        self.store, self.encoder, self.products, self.sets = store, encoder, products, sets
        self.fingerprints, self.done, self.plan, self.make_view = fingerprints, done, plan, make_view
        self.dtype, self.views, self.batch_size, self.num_workers = dtype, views, batch_size, num_workers
        self.device, self.strict, self.chunk_rows, self.progress, self.message = device, strict, chunk_rows, progress, message
        self.commit_seconds = commit_seconds
        self.times: LoopTimes | None = None  # set by the local engine's run
        # the version of each embedding table that `done` was read at (None: no table yet)
        self.known = {p: store.table_versions().get(f"emb_{sets[p]}") for p in products}

    def _refresh_done(self, product: str) -> None:
        """Inside a transaction (the store lock held, the store's view refreshed): read ``done`` again
        when another process has committed to the product's table since it was read, so that two
        runs of the same extract at once do not both write a (sample, view)."""
        table = f"emb_{self.sets[product]}"
        now = self.store.table_versions().get(table)
        if now != self.known[product]:
            self.done[product] = done_views(self.store, table, self.fingerprints[product])
            self.known[product] = now

    def _commit(self, pending: dict[str, list[pa.RecordBatch]], rejects: list[tuple[str, str]],
                record: Callable[[Any, dict[str, int]], int], added: dict[str, int]) -> tuple[int, bool]:
        """One chunk = one store transaction (with the run's provenance rows). Returns the text rows
        written and whether a store version was made."""
        text_rows = 0
        before = self.store.version
        with self.store.transaction(self.message) as tx:
            for p, batches in pending.items():
                self._refresh_done(p)
                fresh = [b for b in (drop_done(rb, self.done[p]) for rb in batches) if b is not None]
                if fresh:
                    added[p] += tx.append(f"emb_{self.sets[p]}", fresh)
            if rejects:
                tx.append("rejects", rejects_rows(rejects, self.message))
            text_rows = record(tx, added)
        for p in pending:  # the store now shows this commit (or none)
            self.known[p] = self.store.table_versions().get(f"emb_{self.sets[p]}")
        return text_rows, self.store.version != before

    def run(self, record: Callable[[Any, dict[str, int]], int]) -> tuple[dict[str, int], int, int, int, int]:
        plan = self.plan
        added = {p: 0 for p in self.products}
        pending: dict[str, list[pa.RecordBatch]] = {p: [] for p in self.products}
        rejects: list[tuple[str, str]] = []
        chunk_samples = embedded = rejected = chunks = text_rows = 0
        bar = progress_bar(len(plan.positions), enabled=self.progress, desc=f"extract {self.encoder.name}")
        last_commit = time.perf_counter()
        committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurelt-commit")
        in_flight: Future[tuple[int, bool]] | None = None
        times = self.times = LoopTimes()
        clock = time.perf_counter

        def landed() -> None:  # wait for the commit in flight (raising its error) and count it
            nonlocal in_flight, text_rows, chunks
            if in_flight is not None:
                t0 = clock()
                written, made = in_flight.result()
                times.commit += clock() - t0
                in_flight = None
                text_rows += written
                chunks += int(made)

        try:
            batches = view_batches(self.store.root, plan.samples_version, self.store.storage_options, plan, self.make_view,
                                   batch_size=self.batch_size, views=self.views, num_workers=self.num_workers)
            for batch, vecs in encoded(batches, self.encoder, self.products, device=self.device,
                                        prepare=self.make_view.finish, times=times):
                t_rows = clock()
                if batch["rejects"]:
                    if self.strict:
                        sid, reason = batch["rejects"][0]
                        raise ValueError(f"--strict: sample {sid} failed to decode: {reason}")
                    rejects.extend(batch["rejects"])
                    rejected += len(batch["rejects"])
                if vecs is not None:
                    for p in self.products:
                        rb = new_rows(batch, vecs[p], self.done[p], self.fingerprints[p], self.dtype)
                        if rb is not None:
                            pending[p].append(rb)
                embedded += batch["embedded"]
                chunk_samples += batch["samples"]
                bar.update(batch["samples"])
                times.rows += clock() - t_rows
                if chunk_samples >= self.chunk_rows or (
                        chunk_samples and time.perf_counter() - last_commit >= self.commit_seconds):
                    landed()
                    in_flight = committer.submit(self._commit, pending, rejects, record, added)
                    pending = {p: [] for p in self.products}
                    rejects = []
                    chunk_samples = 0
                    last_commit = time.perf_counter()
            landed()
            if any(pending.values()) or rejects or chunks == 0:  # chunks == 0: the text rows may be new
                t0 = clock()
                written, made = self._commit(pending, rejects, record, added)
                times.commit += clock() - t0
                text_rows += written
                chunks += int(made)
        finally:
            committer.shutdown(wait=True)  # an interrupted run still lands the chunk it handed over
            bar.close()
        return added, embedded, rejected, chunks, text_rows
