"""Train a head from cached features, evaluate it, and record the run in the store.

``train_head(store, cfg)`` is what ``featurelt train-head`` runs:

1. pin the store (``cfg.as_of``, default the latest version) and read, at that version, the classes
   table, the embedding sets of the train and eval splits (:func:`featurelt.data.features.load_features`)
   and, for heads and samplers that use them, the class text embeddings;
2. put the features on the device once (CPU, or CUDA when it fits in free GPU memory; otherwise they
   stay in pinned host memory and each batch is gathered and copied). When they do not fit in RAM
   (``cfg.stream_features``, see :func:`~featurelt.data.features.load_features`) they stay in the store:
   each batch's rows are read with ``LanceDataset.take`` and copied to the device;
3. for each epoch, draw the sampler's batches (METHODS.md sections 1, 3-6), mix inputs and one-hot
   labels where the sampler gives a partner (``x = lam_x x_i + (1 - lam_x) x_j``, soft target
   ``lam_y e_{y_i} + (1 - lam_y) e_{y_j}``), step the optimizer on the loss (plus the prototype add-on of
   section 2), cosine-anneal the learning rate per epoch. A fitted head (``ncm``, ``knn``) runs no epochs:
   it is made in one pass over the train rows of target classes (:meth:`HeadTrainer.fit`); its runs row says
   ``loss = sampler = none``, ``epochs = 0``;
4. evaluate on the eval split: original rows of target classes only, logits of auxiliary classes
   dropped (only the first K_target columns are kept, section 3), optional post-hoc logit adjustment
   (section 1); metrics of section 0 (:mod:`featurelt.metrics`);
5. save the head's ``state_dict`` (``head.pt``) and the resolved config (``config.yaml``) in the run
   directory, and write ONE store transaction: a ``runs`` row and the ``predictions`` rows.

No encoder is imported anywhere here: re-running a head never re-extracts.
Reproducibility: every seed is set from ``cfg.seed`` and deterministic algorithms are switched on
while training, so the same config at the same store version (``--as-of``) gives the same metrics
and predictions on the same device type.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurelt.config import TrainCfg
from featurelt.data.features import MEMORY_FRACTION, FeatureSet, StoreRows, load_features, load_text_embeddings
from featurelt.heads import HEADS, HeadContext
from featurelt.losses import LOSSES, LossContext, post_hoc_logit_adjust
from featurelt.losses.prototype import ProtoLoss
from featurelt.metrics import buckets_from_classes, compute_metrics
from featurelt.samplers import SAMPLERS, Sampler, SamplerContext
from featurelt.store import Store, command_line, utcnow

if TYPE_CHECKING:
    from featurelt.heads.base import Head

logger = logging.getLogger("featurelt.train")

COLLAPSE_FRACTION = 0.9  # a run predicting one class for more of the eval rows gets a warning note
EVAL_BATCH = 8192        # rows per evaluation forward pass
DEVICE_FRACTION = 0.5    # features go to the GPU when they take at most this fraction of free memory


# ---------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Everything the training loop reads, already on its device (see :func:`place`)."""

    x: Tensor | StoreRows           # [N, D_total] float32 train features: device, pinned host or (streamed) the store
    y: Tensor                       # [N] long labels (same device as x)
    source: np.ndarray              # [N] str: original | auxiliary | generated
    class_counts: Tensor            # [K] float n_y (original rows; auxiliary classes: their rows), CPU
    neighbor_of: Tensor             # [K] long, -1 for target classes, CPU
    num_target: int                 # K_target
    in_dims: list[int]              # D of each embedding set
    text: Tensor | None = None      # [K, Dt] class text embeddings, CPU
    views: Tensor | StoreRows | None = None  # [N, V, D_total] augmented views (momentum sampler), where x is
    view_strength: np.ndarray | None = None  # [N, V] aug_strength of each view
    bucket_many: int | None = None  # classes-table thresholds (many > bucket_many, few < bucket_few),
    bucket_few: int | None = None   #   passed to samplers that take them (auxiliary ratio rule, section 3)
    streamed: bool = False          # True: x lives on the host or in the store; each batch is copied to `device`
    label_map: LabelMap | None = None  # store labels <-> the head indices of y (None: they are equal)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    @property
    def num_views(self) -> int:
        """Cached views per sample (1 when only view 0 was read)."""
        if self.views is None:
            return 1
        return self.views.num_views if isinstance(self.views, StoreRows) else int(self.views.shape[1])

    @property
    def features_in(self) -> str:
        """Where the train features live: ``device``, ``host`` (pinned, copied per batch) or ``store``."""
        return "store" if isinstance(self.x, StoreRows) else "host" if self.streamed else "device"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(device)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of features may live on ``device`` (always on CPU: they are in RAM already)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_FRACTION * free


def place(array: np.ndarray, device: torch.device, *, stream: bool) -> Tensor:
    """numpy -> tensor on ``device`` (``stream``: pinned host memory, copied per batch instead)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if stream:
        return t.pin_memory() if device.type == "cuda" else t
    return t.to(device)


def class_counts_of(labels: np.ndarray, source: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K]`` n_y of the train rows: original and auxiliary rows count, generated rows do not (METHODS.md notation)."""
    keep = source != "generated"
    return np.bincount(labels[keep], minlength=num_classes)[:num_classes].astype(np.float64)


# ---------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """What one ``train_head`` call did."""

    run_id: str
    config: TrainCfg                 # resolved config (as_of = the store version read)
    metrics: dict[str, Any]          # see featurelt.metrics.compute_metrics
    train_seconds: float             # wall time of the training epochs
    epoch_seconds: list[float]       # wall time of each epoch
    eval_seconds: float              # wall time of evaluation
    load_seconds: float              # wall time of reading features from the store
    pinned_versions: dict[str, Any]  # store version and per-table Lance versions read
    checkpoint: str | None           # head.pt path (None when not written)
    device: str                      # device trained on
    streamed: bool                   # features streamed per batch (from host memory or the store)
    features_in: str = "device"      # device | host | store (TrainData.features_in)
    predictions: pa.Table | None = None  # the predictions rows written
    notes: list[str] = field(default_factory=list)  # log lines of the run (also metrics["notes"] in the runs row)


# ---------------------------------------------------------------------------------------- determinism
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic torch algorithms while training (restored afterwards).

    On CUDA this also needs ``CUBLAS_WORKSPACE_CONFIG``; it is set if the user has not set it.
    ``warn_only``: an op without a deterministic implementation warns rather than failing the run.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.benchmark = cudnn


# ---------------------------------------------------------------------------------------- the loop
def input_statistics(x: Tensor | StoreRows, device: torch.device, *, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std ``[D]`` (float32, on ``device``) of the train features ``x`` [N, D] (view 0),
    accumulated in float64 chunk by chunk (streamed features are read from the store once). A dimension
    with (near) zero spread gets std 1, so it stays 0 after centring."""
    n = len(x)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    sq = torch.zeros_like(total)
    for start in range(0, n, chunk):
        part = torch.as_tensor(x[start:start + chunk]).to(device).double()
        total += part.sum(0)
        sq += (part * part).sum(0)
    mean = total / max(n, 1)
    var = (sq / max(n, 1) - mean * mean).clamp_min(0)
    std = var.sqrt()
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    return mean.float(), std.float()


def _accepts(cls: Any, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def build(kind: str, name: str, cls: Any, ctx: Any, opts: dict[str, Any]) -> Any:
    """``cls(ctx, **opts)``; a bad option becomes a ``ValueError`` naming the component and its options."""
    try:
        return cls(ctx, **opts)
    except TypeError as exc:
        accepted = [n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY]
        raise ValueError(f"{kind} '{name}': bad option(s) {sorted(opts)} ({exc}); accepted: "
                         f"{', '.join(accepted) or '(none)'}") from None


class HeadTrainer:
    """Head + loss + sampler + optimizer over :class:`TrainData`; :meth:`run_epoch` is one epoch.

    Built from the resolved config; used by :func:`train_head` and by ``bench/train_head.py``.
    """

    def __init__(self, cfg: TrainCfg, data: TrainData) -> None:
        self.cfg, self.data, self.device = cfg, data, data.device
        self.notes: list[str] = []  # lines for the run's log (e.g. when ldam's re-weighting starts)
        k = data.num_classes
        ctx = HeadContext(in_dims=list(data.in_dims), num_classes=k, text_embeddings=data.text)
        self.head: Head = build("head", cfg.head, HEADS.get(cfg.head), ctx, cfg.head_opts).to(self.device)
        if cfg.tau_norm > 0:  # refuse before training a head that cannot be tau-normalised
            self.head.tau_normalised_logits(torch.zeros(1, ctx.in_dim, device=self.device), cfg.tau_norm)
        self.fitted = self.head.fitted  # knn, ncm: one pass of fit() instead of epochs
        # (x - mean) / std of the train features, applied wherever features reach the head
        self.input_norm: tuple[Tensor, Tensor] | None = None
        if cfg.standardize == "on" or (cfg.standardize == "auto" and self.head.standardize_input):
            self.input_norm = input_statistics(data.x, self.device)
        elif cfg.standardize == "auto" and self.head.takes_input_statistics:
            self.head.set_input_statistics(*input_statistics(data.x, self.device))
        if self.fitted:
            if cfg.proto:
                raise ValueError(f"head '{cfg.head}' is fitted, not trained: --proto does not apply")
            return
        loss_ctx = LossContext(class_counts=data.class_counts, neighbor_of=data.neighbor_of, num_target=data.num_target,
                               epochs=cfg.epochs)
        self.loss = build("loss", cfg.loss, LOSSES.get(cfg.loss), loss_ctx, cfg.loss_opts).to(self.device)
        self.notes.extend(self.loss.schedule_notes(cfg.epochs))
        self.proto: ProtoLoss | None = None
        if cfg.proto:
            dim = self._latent_dim()
            self.proto = ProtoLoss(loss_ctx, dim=dim, M=cfg.proto_m, terms=cfg.proto, tau_head=cfg.proto_tau_head,
                                   tau_tail_std=cfg.proto_tau_tail_std, tau_tail_dist=cfg.proto_tau_tail_dist,
                                   beta=cfg.proto_beta, seed=cfg.seed).to(self.device)
        sampler_cls = SAMPLERS.get(cfg.sampler)
        text_sim = None
        if data.text is not None:
            t = F.normalize(data.text.double(), dim=1)
            text_sim = (t @ t.T).numpy()
        labels = data.y.cpu().numpy()
        sctx = SamplerContext(labels=labels, class_counts=data.class_counts.numpy(), source=data.source,
                              neighbor_of=data.neighbor_of.numpy(), num_target=data.num_target, text_sim=text_sim,
                              num_views=data.num_views,
                              batch_size=cfg.batch_size, seed=cfg.seed, aux_cap=cfg.aux_cap)
        opts = dict(cfg.sampler_opts)
        if data.view_strength is not None and _accepts(sampler_cls, "view_strength"):
            opts.setdefault("view_strength", data.view_strength)
        for name, value in (("many", data.bucket_many), ("few", data.bucket_few)):
            if value is not None and _accepts(sampler_cls, name):
                opts.setdefault(name, value)
        self.sampler: Sampler = build("sampler", cfg.sampler, sampler_cls, sctx, opts)
        # only samplers that override feedback() need per-sample losses (ECVL momentum, section 5)
        self.wants_feedback = type(self.sampler).feedback is not Sampler.feedback
        params = list(self.head.parameters())
        if cfg.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.effective_lr, momentum=cfg.momentum,
                                                              weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)

    def standardized(self, x: Tensor) -> Tensor:
        """x: [B, D_total] on the device. Returns ``(x - mean) / std`` when the input is standardised, else x."""
        if self.input_norm is None:
            return x
        mean, std = self.input_norm
        return (x - mean) / std

    def _latent_dim(self) -> int:
        with torch.no_grad():
            was = self.head.training
            self.head.eval()
            d = self.head.features(self.standardized(torch.as_tensor(self.data.x[:1]).to(self.device))).shape[1]
            self.head.train(was)
        return int(d)

    def _gather(self, rows: Tensor, view: Tensor | None) -> Tensor:
        """Features of ``rows`` ([B] long, on the device -- or on the host when streamed); ``view`` [B]
        picks cached views. Returns [B, D_total] on the device, standardised (:meth:`standardized`)."""
        return self.standardized(self._gather_raw(rows, view))

    def _gather_raw(self, rows: Tensor, view: Tensor | None) -> Tensor:
        d = self.data
        if isinstance(d.x, StoreRows):  # read this batch's rows from the store
            src = d.x if view is None else d.views
            x = torch.from_numpy(src.take(rows.numpy(), None if view is None else view.numpy()))  # type: ignore[union-attr]
            return x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x
        if d.streamed:
            x = d.x[rows] if view is None else d.views[rows, view]  # type: ignore[index]
            return x.to(self.device, non_blocking=True)
        if view is None:
            return d.x.index_select(0, rows)
        return d.views[rows, view]  # type: ignore[index]

    def _labels(self, rows: Tensor) -> Tensor:
        d = self.data
        return d.y[rows].to(self.device, non_blocking=True) if d.streamed else d.y.index_select(0, rows)

    def _batches(self, epoch: int) -> Iterator[tuple[Any, dict[str, Tensor | None]]]:
        """``(sampler batch, its fields where the features live)`` for one epoch.

        When the features are on an accelerator and the sampler needs no feedback, the epoch's batches
        are drawn up front and their index tensors copied to the device in one transfer per field
        (instead of one small host-to-device copy per field and step).
        """
        fields = ("index", "partner", "lam_x", "lam_y", "view")
        on_host = self.data.streamed or self.device.type == "cpu"
        if on_host or self.wants_feedback:
            for b in self.sampler.epoch(epoch):
                yield b, {f: (None if getattr(b, f) is None else
                              getattr(b, f) if on_host else getattr(b, f).to(self.device, non_blocking=True))
                          for f in fields}
            return
        batches = list(self.sampler.epoch(epoch))
        sizes = [len(b.index) for b in batches]
        moved: dict[str, list[Tensor] | None] = {}
        for f in fields:
            parts = [getattr(b, f) for b in batches]
            if any(p is None for p in parts):
                moved[f] = None
                continue
            moved[f] = list(torch.cat(parts).pin_memory().to(self.device, non_blocking=True).split(sizes))
        for i, b in enumerate(batches):
            yield b, {f: (None if moved[f] is None else moved[f][i]) for f in fields}  # type: ignore[index]

    def run_epoch(self, epoch: int) -> float:
        """One pass of the sampler. Returns the mean training loss (one host sync per epoch)."""
        self.head.train()
        total = torch.zeros((), device=self.device)
        steps = 0
        k = self.data.num_classes
        for batch, b in self._batches(epoch):
            x = self._gather(b["index"], b["view"])  # type: ignore[arg-type]
            y = self._labels(b["index"])  # type: ignore[arg-type]
            target: Tensor = y
            if b["partner"] is not None:
                lam_x = b["lam_x"].to(torch.float32)[:, None]  # type: ignore[union-attr]
                lam_y = (b["lam_y"] if b["lam_y"] is not None else b["lam_x"]).to(torch.float32)[:, None]  # type: ignore[union-attr]
                x = lam_x * x + (1 - lam_x) * self._gather(b["partner"], None)
                y_j = self._labels(b["partner"])
                target = lam_y * F.one_hot(y, k).float() + (1 - lam_y) * F.one_hot(y_j, k).float()
            logits, z = self.head.logits_and_features(x)
            if self.wants_feedback:
                per = self.loss.per_sample(logits, target, epoch=epoch)
                loss = self.loss.reduce(per, target, epoch=epoch)
                self.sampler.feedback(batch.index, per.detach(), batch.view)
            else:
                loss = self.loss(logits, target, epoch=epoch)
            if self.proto is not None:
                loss = loss + self.proto(z, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
            steps += 1
        self.sched.step()
        if steps == 0:
            raise ValueError(f"sampler '{self.cfg.sampler}' yielded no batch in epoch {epoch}")
        mean = float(total) / steps
        if not math.isfinite(mean):
            raise FloatingPointError(f"training loss is {mean} in epoch {epoch} (lr {self.cfg.effective_lr} too high?)")
        return mean

    @torch.no_grad()
    def fit(self) -> None:
        """Fitted heads (``head.fitted``): hand the train rows of target classes, in order, to
        ``head.fit`` in batches. Rows of auxiliary classes are left out: evaluation masks their
        classes away (section 3), and a kNN query whose neighbours were all auxiliary would have no vote."""
        target = torch.nonzero(self.data.y.cpu() < self.data.num_target).flatten()
        on_host = self.data.streamed or self.device.type == "cpu"

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for part in target.split(EVAL_BATCH):
                rows = part if on_host else part.to(self.device)
                yield self._gather(rows, None), self._labels(rows)

        self.head.eval()
        self.head.fit(batches())

    @torch.no_grad()
    def predict(self, x: np.ndarray | Tensor, *, tau_norm: float = 0.0) -> Tensor:
        """Logits [N, K] (all classes) of features [N, D_total], in batches; on the device. ``tau_norm > 0``:
        with the classifier's rows tau-normalised (section 1; heads linear and mlp)."""
        self.head.eval()
        out = []
        for start in range(0, len(x), EVAL_BATCH):
            chunk = x[start:start + EVAL_BATCH]
            chunk = self.standardized(torch.as_tensor(chunk).to(self.device, non_blocking=True))
            out.append(self.head.tau_normalised_logits(chunk, tau_norm) if tau_norm > 0 else self.head(chunk))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------- entry point
def new_run_id() -> str:
    return f"{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LabelMap:
    """Store labels <-> head indices: target classes first, then auxiliary ones, each in label order.

    Heads, losses and samplers number auxiliary classes K_target..K-1 (METHODS.md section 3); the store
    numbers classes in the order they were ingested, so an original class ingested after an auxiliary one
    has a larger label. Training works in head indices; predictions and runs rows keep store labels.
    """

    to_store: np.ndarray  # [K] int64: store label of head index i
    to_head: np.ndarray   # [max label + 1] int64: head index of a store label (-1: not a class)
    num_target: int       # K_target

    @classmethod
    def from_classes(cls, classes: pa.Table) -> "LabelMap":
        labels = np.asarray(classes.column("label").to_pylist(), dtype=np.int64)
        aux = np.asarray([s == "auxiliary" for s in classes.column("source").to_pylist()], dtype=bool)
        order = np.concatenate([np.sort(labels[~aux]), np.sort(labels[aux])])
        to_head = np.full(int(labels.max()) + 1 if labels.size else 0, -1, dtype=np.int64)
        to_head[order] = np.arange(order.size)
        return cls(to_store=order, to_head=to_head, num_target=int((~aux).sum()))

    def lookup(self, labels: np.ndarray) -> np.ndarray:
        """Store labels [N] -> head indices [N] int64, -1 for a label outside the classes table."""
        labels = np.asarray(labels, dtype=np.int64)
        ok = (labels >= 0) & (labels < self.to_head.size)
        idx = np.full(labels.shape, -1, dtype=np.int64)
        idx[ok] = self.to_head[labels[ok]]
        return idx

    def head(self, labels: np.ndarray, what: str) -> np.ndarray:
        """:meth:`lookup`, with a ValueError naming ``what`` for a label outside the classes table."""
        idx = self.lookup(labels)
        if (idx < 0).any():
            bad = int(np.asarray(labels)[idx < 0][0])
            raise ValueError(f"{what} has label {bad}, which is not in the classes table "
                             f"(labels {', '.join(map(str, np.sort(self.to_store)[:10]))}...)")
        return idx

    def is_target(self, labels: np.ndarray) -> np.ndarray:
        """[N] bool: the store label is a target (non-auxiliary) class."""
        idx = self.lookup(labels)
        return (idx >= 0) & (idx < self.num_target)


def _classes(store: Store) -> tuple[pa.Table, LabelMap]:
    """The classes table in head order (target classes, then auxiliary ones) and its :class:`LabelMap`."""
    if not store.has_table("classes"):
        raise ValueError(f"store {store.root} has no classes table at version {store.version}: run `featurelt ingest` first")
    classes = store.read("classes")
    label_map = LabelMap.from_classes(classes)
    position = {int(v): i for i, v in enumerate(classes.column("label").to_pylist())}
    return classes.take(pa.array([position[int(v)] for v in label_map.to_store], pa.int64())), label_map


def load_train_data(store: Store, cfg: TrainCfg, *, device: torch.device, views: bool) -> tuple[TrainData, FeatureSet, pa.Table]:
    """Read the train split, classes and text embeddings at the pinned version; place them on ``device``.

    Labels, class counts, ``neighbor_of`` and text rows are in head order (:class:`LabelMap`, also in
    ``TrainData.label_map``); the returned classes table is in that order too.
    """
    classes, label_map = _classes(store)
    num_target = label_map.num_target
    k = classes.num_rows
    # on CUDA, features too large for the GPU also take a pinned host copy: count them twice for "auto"
    fraction = MEMORY_FRACTION / 2 if device.type == "cuda" else MEMORY_FRACTION
    train = load_features(store, list(cfg.features), split=cfg.train_split, views=views, stream=cfg.stream_features,
                          memory_fraction=fraction)
    y = label_map.head(train.labels, f"train split '{cfg.train_split}'")
    counts = class_counts_of(y, train.source, k)
    neighbor = neighbor_of_head(classes, label_map)
    text = None
    if cfg.text_set:
        rows = load_text_embeddings(store, cfg.text_set, num_classes=int(label_map.to_store.max()) + 1)
        text = torch.from_numpy(np.ascontiguousarray(rows[label_map.to_store]))
    if train.streamed:  # vectors stay in the store; labels (small) on the host
        stream, x, views_t = True, train.x, train.views
    else:
        nbytes = train.x.nbytes + (train.views.nbytes if train.views is not None else 0)  # type: ignore[union-attr]
        stream = not fits_on_device(nbytes, device)
        x = place(train.x, device, stream=stream)  # type: ignore[arg-type]
        views_t = place(train.views, device, stream=stream) if train.views is not None else None  # type: ignore[arg-type]
    data = TrainData(
        x=x, y=place(y, device, stream=stream), label_map=label_map,
        source=train.source, class_counts=torch.from_numpy(counts).float(), neighbor_of=torch.from_numpy(neighbor),
        num_target=num_target, in_dims=list(train.dims), text=text, views=views_t,
        view_strength=train.view_strength, streamed=stream, device=device,
        bucket_many=int(classes.column("bucket_many")[0].as_py()), bucket_few=int(classes.column("bucket_few")[0].as_py()))
    return data, train, classes


def dominant_prediction(pred: np.ndarray) -> tuple[int, float]:
    """(most predicted class, the fraction [0, 1] of rows predicted as it) of predictions [N]."""
    if len(pred) == 0:
        return -1, 0.0
    values, counts = np.unique(pred, return_counts=True)
    i = int(np.argmax(counts))
    return int(values[i]), float(counts[i] / len(pred))


def evaluate(trainer: HeadTrainer, feats: FeatureSet, *, num_target: int, post_hoc_tau: float,
             class_counts: Tensor, tau_norm: float = 0.0,
             to_store: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N], prediction [N], top5 [N, min(5, K_target)], score [N]) over target classes only.
    ``to_store`` [K]: head index -> store label for prediction and top5 (:class:`LabelMap`); labels are
    ``feats.labels`` as stored.

    Auxiliary logits are dropped before the softmax (METHODS.md section 3); with ``tau_norm > 0`` the
    classifier rows are tau-normalised first, and with ``post_hoc_tau > 0`` the kept logits become
    ``z_j - tau log pi_j`` (section 1).
    """
    logits = trainer.predict(feats.x, tau_norm=tau_norm)[:, :num_target]
    if post_hoc_tau > 0:
        logits = post_hoc_logit_adjust(logits, class_counts.to(logits.device), post_hoc_tau)
    probs = torch.softmax(logits.float(), dim=1)
    score, top = probs.topk(min(5, num_target), dim=1)
    top = top.cpu().numpy().astype(np.int64)
    if to_store is not None:
        top = np.asarray(to_store, dtype=np.int64)[top]
    top = top.astype(np.int32)
    return feats.labels, top[:, 0], top, score[:, 0].cpu().numpy().astype(np.float32)


def train_head(store: Store | str | os.PathLike[str], cfg: TrainCfg, *, write: bool = True,
               progress: bool = False, message: str | None = None,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Train, evaluate and record one head (module docstring). ``store``: a Store or its root path.

    write: save the checkpoint + config and write the runs / predictions rows (False: only compute).
    progress: show a tqdm bar over the epochs (on stderr).
    log: called with each note of the run when it arises (default: the ``featurelt.train`` logger); the
    notes are also in ``RunResult.notes`` and in the runs row's ``metrics["notes"]``.
    """
    notes: list[str] = []

    def note(line: str, *, warning: bool = False) -> None:
        notes.append(line)
        if log is not None:
            log(line)
        else:
            logger.log(logging.WARNING if warning else logging.INFO, line)

    if not cfg.features:
        raise ValueError("no embedding sets given: --features NAME[,NAME...] (see `featurelt embeddings`)")
    root = store.root if isinstance(store, Store) else str(store)
    storage_options = store.storage_options if isinstance(store, Store) else None
    pinned = Store(root, as_of=cfg.as_of, storage_options=storage_options)
    if pinned.version == 0:
        raise ValueError(f"store {root} is empty: ingest data and extract features first")
    device = resolve_device(cfg.device)
    run_id = new_run_id()
    resolved = cfg.replace(as_of=str(pinned.version), lr=cfg.effective_lr)
    seed_everything(cfg.seed)

    t0 = time.perf_counter()
    sampler_cls = SAMPLERS.get(cfg.sampler)
    HEADS.get(cfg.head), LOSSES.get(cfg.loss)  # fail on unknown names before reading features
    data, train, classes = load_train_data(pinned, cfg, device=device, views=_accepts(sampler_cls, "view_strength"))
    del train  # once the features are placed, only TrainData holds them (the host copy can go)
    evalset = load_features(pinned, list(cfg.features), split=cfg.eval_split, stream=cfg.stream_features)
    label_map = data.label_map
    assert label_map is not None
    keep = (evalset.source == "original") & label_map.is_target(evalset.labels)
    if not keep.any():
        raise ValueError(f"eval split '{cfg.eval_split}' has no original rows of target classes")
    evalset = evalset.select(keep)
    load_seconds = time.perf_counter() - t0

    epoch_seconds: list[float] = []
    with deterministic(device):
        seed_everything(cfg.seed)
        trainer = HeadTrainer(cfg, data)
        for line in trainer.notes:
            note(line)
        bar = None
        if progress and not trainer.fitted:
            from tqdm import tqdm

            bar = tqdm(total=cfg.epochs, desc=f"train-head {cfg.head}/{cfg.loss}/{cfg.sampler}", unit="epoch", disable=None,
                       leave=False)
        t_train = time.perf_counter()
        if trainer.fitted:
            trainer.fit()
        for epoch in range(0 if trainer.fitted else cfg.epochs):
            te = time.perf_counter()
            loss = trainer.run_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds.append(time.perf_counter() - te)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
        train_seconds = time.perf_counter() - t_train
        if bar is not None:
            bar.close()
        te = time.perf_counter()
        labels, pred, top5, score = evaluate(trainer, evalset, num_target=data.num_target,
                                             post_hoc_tau=cfg.post_hoc_tau, class_counts=data.class_counts,
                                             tau_norm=cfg.tau_norm, to_store=label_map.to_store)
        metrics = compute_metrics(labels, pred, buckets_from_classes(classes))
        eval_seconds = time.perf_counter() - te
    top_class, top_fraction = dominant_prediction(pred)
    if top_fraction > COLLAPSE_FRACTION:
        names = dict(zip(classes.column("label").to_pylist(), classes.column("name").to_pylist()))
        note(f"warning: the head predicts class {top_class} ('{names.get(top_class, '?')}') for "
             f"{100 * top_fraction:.0f}% of the {len(pred)} '{cfg.eval_split}' rows: it has collapsed to one class "
             f"(lr {cfg.effective_lr}, optimizer {cfg.optimizer}, standardize {cfg.standardize}; try another --lr, "
             f"--standardize on or more --epochs)", warning=True)

    read_tables = ["samples", "classes", *(f"emb_{s}" for s in cfg.features)] + (["text_embeddings"] if cfg.text_set else [])
    versions = pinned.table_versions()
    pinned_versions = {"store_version": pinned.version, "as_of": cfg.as_of,
                       "tables": {t: versions[t] for t in read_tables if t in versions}}
    metrics = {**metrics, "train_seconds": train_seconds, "eval_seconds": eval_seconds, "load_seconds": load_seconds,
               "epoch_seconds": epoch_seconds, "device": str(device), "streamed": data.streamed,
               "features_in": data.features_in, "num_train": int(len(data.y)), "notes": notes,
               "top_class_fraction": top_fraction, "collapsed": top_fraction > COLLAPSE_FRACTION}
    preds = predictions_table(run_id, evalset.sample_ids, cfg.eval_split, labels, pred, top5, score)
    checkpoint = None
    if write:
        checkpoint = save_checkpoint(trainer.head, resolved, root=root, run_id=run_id, input_norm=trainer.input_norm)
        row = runs_row(run_id, head=cfg.head, loss="none" if trainer.fitted else cfg.loss,
                       sampler="none" if trainer.fitted else cfg.sampler, features=",".join(cfg.features),
                       config_yaml=resolved.to_yaml(), pinned_versions=pinned_versions, metrics=metrics,
                       train_seconds=train_seconds, epochs=len(epoch_seconds), seed=cfg.seed, checkpoint=checkpoint)
        writer = Store(root, storage_options=storage_options)
        with writer.transaction(message or command_line()) as tx:
            tx.append("runs", row)
            tx.append("predictions", preds)
    return RunResult(run_id=run_id, config=resolved, metrics=metrics, train_seconds=train_seconds,
                     epoch_seconds=epoch_seconds, eval_seconds=eval_seconds, load_seconds=load_seconds,
                     pinned_versions=pinned_versions, checkpoint=checkpoint, device=str(device),
                     streamed=data.streamed, features_in=data.features_in, predictions=preds, notes=notes)


def predictions_table(run_id: str, sample_ids: np.ndarray, split: str, labels: np.ndarray, pred: np.ndarray,
                      top5: np.ndarray, score: np.ndarray) -> pa.Table:
    """``predictions`` rows of one evaluated split (labels, prediction, top5 in store labels)."""
    return pa.table({
        "run_id": pa.array([run_id] * len(labels), pa.string()),
        "sample_id": pa.array(np.asarray(sample_ids).tolist(), pa.string()),
        "split": pa.array([split] * len(labels), pa.string()),
        "label": pa.array(np.asarray(labels).astype(np.int32)),
        "prediction": pa.array(np.asarray(pred).astype(np.int32)),
        "top5": pa.array(np.asarray(top5).tolist(), pa.list_(pa.int32())),
        "score": pa.array(np.asarray(score).astype(np.float32)),
    })


def runs_row(run_id: str, *, head: str, loss: str, sampler: str, features: str, config_yaml: str,
             pinned_versions: dict[str, Any], metrics: dict[str, Any], train_seconds: float, epochs: int, seed: int,
             checkpoint: str | None) -> pa.Table:
    """The ``runs`` row of a run (train-head, and finetune's evaluation); ``metrics`` from compute_metrics + extras."""
    return pa.table({
        "run_id": [run_id], "time": pa.array([utcnow()], pa.timestamp("us")), "head": [head],
        "loss": [loss], "sampler": [sampler], "features": [features],
        "config": [config_yaml], "pinned_versions": [json.dumps(pinned_versions, sort_keys=True, default=str)],
        "metrics": [json.dumps(metrics, sort_keys=True, default=str)], "acc_all": [metrics["acc_all"]],
        "acc_many": pa.array([metrics["acc_many"]], pa.float64()),
        "acc_medium": pa.array([metrics["acc_medium"]], pa.float64()),
        "acc_few": pa.array([metrics["acc_few"]], pa.float64()),
        "macro_f1": [metrics["macro_f1"]], "head_tail_gap": pa.array([metrics["head_tail_gap"]], pa.float64()),
        "train_seconds": [float(train_seconds)], "epochs": pa.array([int(epochs)], pa.int32()),
        "seed": pa.array([int(seed)], pa.int64()), "checkpoint": pa.array([checkpoint], pa.string()),
    })


def neighbor_of_head(classes: pa.Table, label_map: LabelMap) -> np.ndarray:
    """``[K]`` int64 neighbor_of in head order (-1 for target classes and for parents that are not targets)."""
    parents = [None if v is None else int(v) for v in classes.column("neighbor_of").to_pylist()]
    neighbor = np.array([-1 if v is None or not 0 <= v < label_map.to_head.size else label_map.to_head[v]
                         for v in parents], dtype=np.int64)
    neighbor[:label_map.num_target] = -1
    neighbor[neighbor >= label_map.num_target] = -1  # a parent must be a target class
    return neighbor


def save_checkpoint(head: nn.Module, cfg: TrainCfg, *, root: str, run_id: str,
                    input_norm: tuple[Tensor, Tensor] | None = None) -> str:
    """``head.pt`` and ``config.yaml`` in ``cfg.out_dir`` or ``<store>/checkpoints/<run_id>/``.

    ``head.pt`` holds ``{"state_dict": head.state_dict(), "input_mean": [D] | None, "input_std": [D] | None}``
    (the standardisation the head was trained with: its input is ``(x - input_mean) / input_std``);
    read it with :func:`load_checkpoint`.
    """
    if cfg.out_dir:
        out = Path(cfg.out_dir).expanduser() / run_id
    elif "://" not in root or root.startswith("file://"):
        out = Path(root.removeprefix("file://")) / "checkpoints" / run_id
    else:
        raise ValueError(f"store {root} is not a local directory: pass --out-dir for the checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "head.pt"
    state = head.state_dict()  # knn: its index and labels are the "_extra_state" entry (a dict of tensors)
    mean, std = input_norm if input_norm is not None else (None, None)
    torch.save({"state_dict": {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()},
                "input_mean": None if mean is None else mean.detach().cpu(),
                "input_std": None if std is None else std.detach().cpu()}, path)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return str(path)


@dataclass
class HeadCheckpoint:
    """A ``head.pt`` read back: the head's ``state_dict`` and the standardisation of its input."""

    path: str
    state_dict: dict[str, Any]
    input_mean: Tensor | None = None  # [D]: the head reads (x - input_mean) / input_std
    input_std: Tensor | None = None

    def standardized(self, x: Tensor) -> Tensor:
        """x: [B, D] features as stored. Returns what the head was trained on, [B, D]."""
        if self.input_mean is None or self.input_std is None:
            return x
        return (x - self.input_mean.to(x)) / self.input_std.to(x)


def load_checkpoint(path: str | os.PathLike[str]) -> HeadCheckpoint:
    """Read a head checkpoint written by :func:`save_checkpoint` (or an older bare ``state_dict``) with
    ``torch.load(weights_only=True)``. A missing file is a FileNotFoundError and a damaged or foreign one
    a ValueError, both naming the file."""
    import pickle

    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"head checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"head checkpoint {path} cannot be read (damaged, or not a featurelt head.pt): "
                         f"{type(exc).__name__}: {first}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"head checkpoint {path} holds a {type(obj).__name__}, not a featurelt head checkpoint")
    if "state_dict" not in obj:  # bare state_dict (checkpoints written before input standardisation)
        return HeadCheckpoint(path=path, state_dict=obj)
    if not isinstance(obj["state_dict"], dict):
        raise ValueError(f"head checkpoint {path}: 'state_dict' is a {type(obj['state_dict']).__name__}, not a dict")
    return HeadCheckpoint(path=path, state_dict=obj["state_dict"], input_mean=obj.get("input_mean"),
                          input_std=obj.get("input_std"))


# ---------------------------------------------------------------------------------------- sweeps
SWEEP_COLUMNS = ["acc_many", "acc_medium", "acc_few", "acc_all", "macro_f1"]


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``{field: [values]}`` in the given key order (first key varies slowest)."""
    import itertools

    keys = list(grid)
    for k in keys:
        if not grid[k]:
            raise ValueError(f"sweep key '{k}' has no values")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def sweep(store: Store | str | os.PathLike[str], base: TrainCfg, grid: dict[str, list[Any]], *, write: bool = True,
          progress: bool = False, log: Callable[[str], None] | None = None
          ) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Train every point of ``grid`` over ``base``; returns the results and one comparison row per point
    (the grid values, run_id, many / medium / few / all accuracy and macro-F1)."""
    results, rows = [], []
    for point in expand_grid(grid):
        changes: dict[str, Any] = {}
        for key, value in point.items():
            if "." in key:  # head_opts.tau=... : one option of a *_opts field
                name, opt = key.split(".", 1)
                changes.setdefault(name, dict(getattr(base, name)))[opt] = value
            else:
                changes[key] = value
        cfg = base.replace(**changes)
        res = train_head(store, cfg, write=write, progress=progress, log=log)
        results.append(res)
        rows.append({**{k: (",".join(v) if isinstance(v, (list, tuple)) else v) for k, v in point.items()},
                     "run_id": res.run_id, **{c: res.metrics[c] for c in SWEEP_COLUMNS}})
    return results, rows


__all__ = ["TrainData", "LabelMap", "HeadTrainer", "HeadCheckpoint", "load_checkpoint", "RunResult", "train_head", "sweep", "expand_grid", "evaluate",
           "load_train_data", "resolve_device", "save_checkpoint", "SWEEP_COLUMNS"]
