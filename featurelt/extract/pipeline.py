"""``extract()``: checks the arguments, builds the encoder, fits, plans, runs an engine, records provenance."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

from featurelt.extract.device import default_num_workers, resolve_device
from featurelt.extract.fit import fit_encoder
from featurelt.extract.local import LocalRun
from featurelt.extract.plan import check_split, done_views, plan_todo, remove_duplicates, set_names, sql_str
from featurelt.extract.provenance import provenance_rows
from featurelt.extract.ray_engine import RayRun, ray_init_args
from featurelt.extract.text import read_templates, text_rows_of, write_text
from featurelt.extract.views import AUGMENTS, ViewMaker
from featurelt.images.loader import worker_context
from featurelt.store import Store, StoreError, utcnow
from featurelt.store.core import command_line

if TYPE_CHECKING:
    from featurelt.encoders.base import Encoder
    from featurelt.extract.encode import LoopTimes

Engine = Literal["local", "ray"]
ResizeOn = Literal["auto", "host", "device"]
Device = Literal["auto", "cpu", "cuda"]
VecDtype = Literal["float32", "float16"]


@dataclass
class ExtractResult:
    """What one extraction run did."""

    encoder: str  # registry name, e.g. "clip:ViT-B-32"
    sets: dict[str, str]  # product -> embedding set name (table emb_<name>)
    rows_added: dict[str, int]  # product -> rows (sample, view) written by this run
    samples_embedded: int  # samples with at least one new row
    samples_skipped: int  # samples whose rows with this fingerprint were already in the store
    rejected: int  # samples that failed to decode (written to `rejects`)
    chunks: int  # store transactions made
    store_version: int  # store version after the run
    seconds: float  # wall time of the embedding loop
    device: str = "cpu"
    text_rows: int = 0  # class text embeddings written (clip text tower / text encoders)
    notes: list[str] = field(default_factory=list)
    times: LoopTimes | None = None  # local engine only

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, ``images_per_second`` and the loop's stage seconds."""
        return {**asdict(self), "images_per_second": self.images_per_second}

    @property
    def images_per_second(self) -> float:
        """Samples embedded per second of the embedding loop."""
        return self.samples_embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        added = sum(self.rows_added.values())
        sets = ", ".join(f"emb_{n}" for n in self.sets.values()) or "(none)"
        line = (f"extract {self.encoder}: {added} rows added to {sets} ({self.samples_embedded} samples, "
                f"{self.images_per_second:.1f} img/s on {self.device}), {self.samples_skipped} skipped "
                f"(already embedded), {self.rejected} rejected; store version {self.store_version}")
        if self.text_rows:
            line += f"; {self.text_rows} class text embeddings"
        if self.times is not None and self.samples_embedded:
            line += "\n" + self.times.summary(self.device)
        return line


def build_encoder(encoder_name: str, *, checkpoint: str | None, device: str, map_size: int,
                   image_size: int | None, seed: int, untrained: bool, pretrained: str | None = None,
                   store: Store | None = None) -> "Encoder":
    from featurelt.encoders import build_encoder

    return build_encoder(encoder_name, checkpoint=checkpoint, device=device, map_size=map_size,
                         image_size=image_size, seed=seed, untrained=untrained, pretrained=pretrained, store=store)


def extract(store: Store, encoder_name: str, *, products: Sequence[str] | None = None, name: str | None = None,
            split: str | None = None, limit: int | None = None, batch_size: int = 64, num_workers: int | None = None,
            device: str = "auto", dtype: VecDtype = "float32", views: int = 0, augment: str | None = None,
            strict: bool = False, checkpoint: str | None = None, map_size: int = 16,
            image_size: int | None = None, templates: list[str] | str | os.PathLike[str] | None = None,
            seed: int = 0, untrained: bool = False, engine: Engine = "local", ray_address: str | None = None,
            ray_gpus_per_task: float = 1.0, ray_cpus: int | None = None, chunk_rows: int = 16384, commit_seconds: float = 10.0,
            fit_samples: int | None = 4096, resize_on: ResizeOn = "auto", progress: bool = True,
            message: str | None = None, pretrained: str | None = None) -> ExtractResult:
    """Embed the store's samples with ``encoder_name``; one embedding set per product.

    ``split`` / ``limit``: which samples (the first ``limit`` rows of the split, in store order).
    ``views`` / ``augment``: augmented views, METHODS.md section 5 (see the module docstring).
    ``num_workers``: DataLoader workers decoding images (None: :func:`default_num_workers`).
    ``fit_samples``: products that are fitted (SAM ``pca_map``, METHODS.md section 2) are fitted on
    the first ``fit_samples`` train-split samples (None: all), once per set; later runs reuse the
    state stored in the set's provenance. ``strict``: a sample that fails to decode raises (naming the sample) instead of going to
    ``rejects``. ``chunk_rows`` / ``commit_seconds``: a store transaction every ``chunk_rows``
    samples at most, and at least every ``commit_seconds`` seconds of work (the unit an interrupted
    run keeps; a commit costs about 15 ms on a local disk). ``engine="ray"`` runs the same work as Ray tasks with one commit (``ray_address`` or a
    local Ray with ``ray_cpus`` CPUs, default all cores; tasks encode on CPU, or with ``device="cuda"`` on the cluster's GPUs,
    ``ray_gpus_per_task`` each, decoding in ``num_workers`` DataLoader workers per task).
    ``resize_on``: where images are resized and cropped; ``device`` (:class:`~featurelt.images.transforms.DeviceResize`
    on the encoder's device, in batches, within 2 grey levels of PIL; workers then only decode, which
    is what keeps a GPU fed, and on the CPU PyTorch's uint8 resampling is 2-4x faster than PIL's) or
    ``host`` (PIL's own resize, in the workers: the reference transform exactly); ``auto`` (default):
    ``device`` (for SAM the device resizes the longer side, normalises, then pads), ``host`` for encoders whose
    vectors must equal a reference (``exact_resize``: ``finetuned:<run_id>`` = the run's ``--export``).
    Encoders with a text tower (``clip:*``) also write class text
    embeddings when the store has a classes table. ``pretrained``: open_clip tag of a ``clip:<model>``
    (its activation and preprocessing; its weights when no ``checkpoint``), recorded in the provenance
    and so in the fingerprint. Returns an :class:`ExtractResult`.
    """
    from featurelt.encoders import ENCODERS

    spec = ENCODERS.get(encoder_name)
    if spec.kind == "text":
        raise ValueError(f"encoder '{encoder_name}' is a text encoder: use extract_text (CLI: the same "
                         "`featurelt extract` command dispatches to it)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if commit_seconds < 0:
        raise ValueError(f"commit_seconds must be >= 0, got {commit_seconds}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    if views and augment is None:
        raise ValueError(f"--views {views} needs --augment (one of: {', '.join(AUGMENTS)})")
    if augment is not None and augment not in AUGMENTS:
        raise ValueError(f"unknown augment '{augment}'; available: {', '.join(AUGMENTS)}")
    if augment is not None and not views:
        raise ValueError(f"--augment {augment} needs --views N (N >= 1 augmented views per sample)")
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine '{engine}'; choose local or ray")
    if resize_on not in ("auto", "host", "device"):
        raise ValueError(f"resize_on must be auto, host or device, got {resize_on!r}")
    if isinstance(templates, (str, os.PathLike)):
        templates = read_templates(templates)
    if store._as_of is not None:
        raise StoreError(f"this Store is pinned to --as-of {store._as_of}; extract writes to the latest version")

    if not ray_gpus_per_task > 0:
        raise ValueError(f"ray_gpus_per_task must be > 0, got {ray_gpus_per_task}")
    ray_init_args(ray_address, ray_cpus)  # checks ray_cpus
    check_split(store, split)
    task_device = "cpu"
    if engine == "ray":
        # Ray: --device auto = CPU tasks; cuda = GPU tasks on the cluster. The driver (encoder build,
        # SAM pca_map fit) uses a local GPU when it has one and the CPU otherwise.
        task_device = "cuda" if device.startswith("cuda") else resolve_device("cpu" if device == "auto" else device)
        dev = resolve_device("auto") if task_device == "cuda" else "cpu"
    else:
        dev = resolve_device(device)
    run_device = task_device if engine == "ray" else dev  # where the images are encoded
    if num_workers is None:  # a CPU encoder uses every core; a GPU needs decoding done in parallel
        num_workers = default_num_workers(run_device)
    encoder = build_encoder(encoder_name, checkpoint=checkpoint, device=dev, map_size=map_size,
                             image_size=image_size, seed=seed, untrained=untrained, pretrained=pretrained, store=store)
    resize_on_device = resize_on == "device" or (resize_on == "auto" and not encoder.exact_resize)
    make_view = ViewMaker(encoder.transform, views=views, augment=augment, seed=seed,
                           resize_on_device=resize_on_device)
    if num_workers and engine == "local":  # its imports overlap the encoder's move, fitting and planning
        worker_context(make_view, start=True)
    encoder.to(dev)
    prods = list(products) if products else list(encoder.products)
    unknown = [p for p in prods if p not in encoder.products]
    if unknown:
        raise ValueError(f"encoder {encoder_name} has no product(s) {unknown}; products: "
                         f"{', '.join(f'{p} ({d}-d)' for p, d in encoder.products.items())}")
    sets = set_names(encoder, prods, name)
    read_versions = store.table_versions()
    store_version = store.version
    notes: list[str] = []
    fitted = fit_encoder(store, encoder, prods, sets, batch_size=batch_size, num_workers=num_workers, device=dev,
                         limit=fit_samples, progress=progress)
    if fitted:
        notes.append(f"fitted {', '.join(fitted)} on the train split")
    fingerprints = {p: encoder.fingerprint(p) for p in prods}
    for p, set_name in sets.items():  # an existing set keeps its dim / dtype: refuse a mismatch up front
        if store.has_table(f"emb_{set_name}"):
            from featurelt.store.schema import embedding_params

            have = embedding_params(store.dataset(f"emb_{set_name}").schema)
            if have != {"dim": int(encoder.products[p]), "dtype": dtype}:
                raise ValueError(f"embedding set '{set_name}' holds {have['dim']}-d {have['dtype']} vectors; this run "
                                 f"makes {encoder.products[p]}-d {dtype}: pass --name for a new set")
    msg = message or command_line()
    done = {}
    for p in prods:
        table, duplicates = f"emb_{sets[p]}", set()
        done[p] = done_views(store, table, fingerprints[p], duplicates)
        if duplicates:  # left by two runs at once before chunks re-checked the table (or by a writer that does not)
            removed = remove_duplicates(store, table, fingerprints[p], msg)
            notes.append(f"removed {removed} duplicate rows from {table}")
            done[p] = done_views(store, table, fingerprints[p])
    plan = plan_todo(store, split=split, limit=limit, views=views, done=done)

    text = None
    if spec.has_text:
        if store.has_table("classes"):
            from featurelt.encoders import build_text_encoder

            tenc = build_text_encoder(encoder_name, checkpoint=checkpoint, templates=templates, device=dev,
                                      seed=seed, untrained=untrained, pretrained=pretrained)
            tname = tenc.default_set_name() if name is None else name
            text = text_rows_of(store, tenc, encoder_name, tname) + (tname,)
        else:
            notes.append("no classes table: class text embeddings not written")

    args = (store, encoder, prods, sets, fingerprints, done, plan, make_view)
    common = dict(dtype=dtype, views=views, batch_size=batch_size, num_workers=num_workers, device=dev, strict=strict,
                  chunk_rows=chunk_rows, commit_seconds=commit_seconds, progress=progress, message=msg)
    runner = (RayRun(*args, **common, ray_address=ray_address, task_device=task_device,
                      ray_gpus_per_task=ray_gpus_per_task, ray_cpus=ray_cpus) if engine == "ray" else LocalRun(*args, **common))

    started = utcnow()
    recorded = False  # the run's provenance rows are in the store
    text_pending = text is not None

    def record(tx: Any, added: dict[str, int]) -> int:
        """Provenance rows go in with the first chunk that adds rows and later chunks update their row
        counts, so a run killed midway leaves the provenance of what it committed; class text rows go
        in with the first commit. Returns the text rows written."""
        nonlocal recorded, text_pending
        if any(added.values()) and not recorded:
            tx.append("embedding_sets", provenance_rows(
                encoder, sets, fingerprints, added, dtype=dtype, read_versions=read_versions,
                store_version=store_version, views=views, augment=augment, split=split, limit=limit,
                engine=engine, device=run_device, now=started,
                resize_on="device" if make_view.resizes_on_device else "host"))
            recorded = True
        elif recorded:
            when = f"TIMESTAMP '{started.isoformat(sep=' ')}'"
            for p, set_name in sets.items():
                tx.update("embedding_sets", {"rows": str(int(added[p]))},
                          where=f"name = {sql_str(set_name)} AND fingerprint = {sql_str(fingerprints[p])} "
                                f"AND time = {when}")
        if text_pending and text is not None:
            text_pending = False
            return write_text(tx, text[0], text[3], text[2])
        return 0

    t0 = time.perf_counter()
    added, embedded, rejected, chunks, text_rows = runner.run(record)
    seconds = time.perf_counter() - t0
    if text is not None and text[0] is None:
        notes.append(f"class text embeddings '{text[3]}' already present")
    return ExtractResult(encoder_name, sets, added, embedded, plan.skipped, rejected, chunks, store.version, seconds,
                         device=run_device, text_rows=text_rows, notes=notes, times=runner.times)
