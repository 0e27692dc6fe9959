"""The Ray engine: shards of the todo rows as Ray tasks writing Lance fragments, one store commit on the driver."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from featurelt.extract.batches import view_batches
from featurelt.extract.encode import encoded
from featurelt.extract.device import progress_bar
from featurelt.extract.local import LocalRun
from featurelt.extract.plan import Plan
from featurelt.extract.rows import new_rows, rejects_rows
from featurelt.extract.views import ViewMaker

if TYPE_CHECKING:
    from featurelt.encoders.base import Encoder


def ray_shard(root: str, storage_options: dict[str, str] | None, samples_version: int, positions: np.ndarray,
               needed: list[tuple[int, ...]], encoder: "Encoder", make_view: ViewMaker, products: list[str],
               sets: dict[str, str], fingerprints: dict[str, str], done: dict[str, dict[str, set[int]]], *,
               dtype: str, views: int, batch_size: int, device: str = "cpu", num_workers: int = 0) -> dict[str, Any]:
    """One Ray task: decode + encode a shard, write its rows as Lance fragments (no commit).

    On CPU the task decodes and encodes in its own process (one thread: Ray runs one task per CPU);
    on a GPU (``device="cuda"``, the GPU Ray assigned) ``num_workers`` DataLoader workers decode and the
    batches go to the GPU pinned.

    Returns ``{"fragments": {product: [FragmentMetadata]}, "rows": {product: n}, "rejects": [...],
    "embedded": n}``; the driver commits all shards' fragments at once.
    """
    import lance
    import torch

    from featurelt.store.schema import arrow_schema

    if device == "cpu":
        torch.set_num_threads(1)
        num_workers = 0
    else:
        encoder.to(device)
    batches = view_batches(root, samples_version, storage_options, Plan(positions, needed, 0, samples_version), make_view,
                           batch_size=batch_size, views=views, num_workers=num_workers)
    out: dict[str, list[pa.RecordBatch]] = {p: [] for p in products}
    rejects: list[tuple[str, str]] = []
    embedded = 0
    for batch, vecs in encoded(batches, encoder, products, device=device, prepare=make_view.finish):
        rejects.extend(batch["rejects"])
        embedded += batch["embedded"]
        if vecs is None:
            continue
        for p in products:
            rb = new_rows(batch, vecs[p], done[p], fingerprints[p], dtype)
            if rb is not None:
                out[p].append(rb)
    frags: dict[str, list[Any]] = {}
    rows: dict[str, int] = {}
    for p in products:
        rows[p] = sum(b.num_rows for b in out[p])
        if not rows[p]:
            frags[p] = []
            continue
        schema = arrow_schema(f"emb_{sets[p]}", dim=int(encoder.products[p]), dtype=dtype)
        table = pa.Table.from_batches(out[p]).cast(schema)
        frags[p] = lance.fragment.write_fragments(table, f"{root}/emb_{sets[p]}.lance", schema=schema,
                                                  storage_options=storage_options)
    return {"fragments": frags, "rows": rows, "rejects": rejects, "embedded": embedded}


def ray_task_workers(nodes: list[dict[str, Any]], wanted: int, gpus_per_task: float) -> int:
    """DataLoader workers per GPU task such that ``1 + workers`` CPUs fit beside every task on the
    poorest GPU node (a task asking for more CPUs than a node has would wait forever)."""
    per_task = [n["Resources"].get("CPU", 0) / (n["Resources"]["GPU"] // gpus_per_task)
                for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) >= gpus_per_task]
    if not per_task:
        return 0
    return max(0, min(wanted, int(min(per_task)) - 1))


def ray_init_args(address: str | None, cpus: int | None) -> dict[str, Any]:
    """``ray.init`` arguments: join the cluster at ``address``, or start a local Ray with ``cpus``
    CPUs (default: this machine's cores, ``os.cpu_count()``)."""
    if cpus is not None and cpus < 1:
        raise ValueError(f"--ray-cpus must be >= 1, got {cpus}")
    if address:
        if cpus is not None:
            raise ValueError(f"--ray-cpus sets the CPUs of a local Ray; the cluster at --ray-address {address} "
                             "has its own")
        return {"address": address, "log_to_driver": False}
    return {"num_cpus": cpus or os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False}


class RayRun(LocalRun):
    """The Ray engine: shards as remote tasks writing fragments; one store commit on the driver."""

    def __init__(self, *args: Any, ray_address: str | None, task_device: str, ray_gpus_per_task: float,
                 ray_cpus: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ray_address, self.task_device, self.gpus_per_task = ray_address, task_device, ray_gpus_per_task
        self.ray_cpus = ray_cpus

    def run(self, record: Callable[[Any, dict[str, int]], int]) -> tuple[dict[str, int], int, int, int, int]:
        import ray

        from featurelt.store.schema import arrow_schema

        started = False
        if not ray.is_initialized():
            ray.init(**ray_init_args(self.ray_address, self.ray_cpus))
            started = True
        plan = self.plan
        added = {p: 0 for p in self.products}
        try:
            n = len(plan.positions)
            resources = ray.cluster_resources()
            if self.task_device == "cuda":
                gpus = float(resources.get("GPU", 0))
                if gpus < self.gpus_per_task:
                    raise ValueError(f"--device cuda with --engine ray: the Ray cluster "
                                     f"({self.ray_address or 'local'}) has {gpus:g} GPUs, each task needs "
                                     f"{self.gpus_per_task:g} (--ray-gpus-per-task); use --device cpu or a cluster with GPUs")
                slots = int(gpus // self.gpus_per_task)
                task_workers = ray_task_workers(ray.nodes(), self.num_workers, self.gpus_per_task)
                task = ray.remote(num_cpus=1 + task_workers, num_gpus=self.gpus_per_task)(ray_shard)
            else:
                slots, task_workers = max(1, int(resources.get("CPU", 1))), 0
                task = ray.remote(num_cpus=1)(ray_shard)
            n_shards = max(1, min(slots, math.ceil(n / max(self.batch_size, 1)))) if n else 0
            bounds = np.linspace(0, n, n_shards + 1).astype(int) if n_shards else []
            bar = progress_bar(n, enabled=self.progress, desc=f"extract {self.encoder.name} (ray)")
            rejects: list[tuple[str, str]] = []
            embedded = 0
            with self.store.transaction(self.message) as tx:
                for p in self.products:  # drop leftovers of killed runs before tasks write fragments
                    tx.reconcile(f"emb_{self.sets[p]}")
                    self._refresh_done(p)  # the lock is held from here to the commit: no other writer
                enc_ref = ray.put(self.encoder.to("cpu"))
                refs = {task.remote(self.store.root, self.store.storage_options, plan.samples_version,
                                    plan.positions[a:b], plan.needed[a:b], enc_ref, self.make_view, self.products,
                                    self.sets, self.fingerprints, self.done, dtype=self.dtype, views=self.views,
                                    batch_size=self.batch_size, device=self.task_device,
                                    num_workers=task_workers): b - a
                        for a, b in zip(bounds[:-1], bounds[1:]) if b > a}
                results = []
                pending = list(refs)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    res = ray.get(ready[0])
                    bar.update(refs[ready[0]])
                    if res["rejects"] and self.strict:
                        sid, reason = res["rejects"][0]
                        raise ValueError(f"--strict: sample {sid} failed to decode: {reason}")
                    results.append(res)
                bar.close()
                for res in results:
                    rejects.extend(res["rejects"])
                    embedded += res["embedded"]
                for p in self.products:
                    frags = [f for res in results for f in res["fragments"][p]]
                    if frags:
                        schema = arrow_schema(f"emb_{self.sets[p]}", dim=int(self.encoder.products[p]), dtype=self.dtype)
                        tx.append_fragments(f"emb_{self.sets[p]}", frags, schema)
                        added[p] = sum(res["rows"][p] for res in results)
                if rejects:
                    tx.append("rejects", rejects_rows(rejects, self.message))
                text_rows = record(tx, added)
        finally:
            if started:
                ray.shutdown()
        return added, embedded, len(rejects), 1, text_rows
