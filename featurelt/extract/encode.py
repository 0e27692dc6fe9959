"""Encoding batches on the device: launch, one batch in flight, read back, and the loop's stage times."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

    from featurelt.encoders.base import Encoder
    from featurelt.images.packing import PackedImages


@dataclass
class LoopTimes:
    """Seconds the local engine's main thread spent in each stage of the embedding loop: where a
    slow run waits. On CUDA the GPU encodes during ``images`` and ``rows``; a GPU that is kept busy
    shows as ``device`` time, a starved one as ``images`` time."""

    images: float = 0.0  # waiting for the next batch of images (DataLoader workers; with none, the decoding itself)
    launch: float = 0.0  # handing a batch to the device and queuing its work (on the CPU: the whole forward)
    device: float = 0.0  # waiting for the device to finish a batch (CUDA)
    rows: float = 0.0    # turning the outputs into Arrow rows
    commit: float = 0.0  # waiting for a chunk commit (they run in a background thread) and the last commit

    def shares(self) -> dict[str, float]:
        """Each stage's fraction of their sum."""
        total = sum(vars(self).values())
        return {k: (v / total if total > 0 else 0.0) for k, v in vars(self).items()}

    def summary(self, device: str) -> str:
        shares = self.shares()
        line = "loop time: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items())
        if device.startswith("cuda") and shares["images"] > 0.3:
            line += (" (the GPU waited for images: more --num-workers, or images stored smaller or in a faster "
                     "format, would feed it)")
        return line


def autocast(device: str) -> Any:
    import contextlib

    import torch

    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


class EncodedBatch:
    """The outputs of one encoded batch, ``{product: float32 tensor [B, D]}`` on the host. On CUDA
    they may still be in flight (computing, then copying into pinned memory): :meth:`result` waits
    for the copy, so the host can prepare the next batch meanwhile."""

    def __init__(self, outputs: dict[str, "torch.Tensor"], ready: Any = None) -> None:
        self.outputs, self.ready = outputs, ready  # ready: a torch.cuda.Event recorded after the copy

    def result(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        return {p: t.numpy() for p, t in self.outputs.items()}


def launch_batch(encoder: "Encoder", x: "torch.Tensor | list[torch.Tensor] | PackedImages", products: list[str], *,
                 device: str, prepare: Callable[[Any], "torch.Tensor"] | None = None,
                 min_batch: int = 1) -> EncodedBatch:
    """Start encoding ``x`` [B,C,H,W] (or B [C,H,W] images of different sizes, as a list or a
    :class:`~featurelt.images.packing.PackedImages`, for a ``prepare`` that resizes); ``prepare``
    (e.g. a :class:`~featurelt.images.transforms.DeviceStage`
    turning uint8 into normalised floats) runs on the device first. On CUDA this returns once the
    work is queued; on the CPU the result is ready. On CUDA out-of-memory the batch is encoded in
    halves (recursively, synchronously) instead of failing."""
    import torch

    from featurelt.images.packing import PackedImages

    try:
        with torch.inference_mode():
            # pinned host memory, so that the copy does not wait for the batch in flight
            pin = device.startswith("cuda")
            if isinstance(x, torch.Tensor):
                on_device = (x.pin_memory() if pin else x).to(device, non_blocking=True)
            else:  # images of different sizes: one buffer, one copy
                on_device = (x if isinstance(x, PackedImages) else PackedImages.pack(x)).to(device, pin=pin)
            if prepare is not None:
                on_device = prepare(on_device)
            with autocast(device):
                out = encoder.encode(on_device, products=products)
            if not device.startswith("cuda"):
                return EncodedBatch({p: out[p].float() for p in products})
            # non_blocking device-to-host copies land in pinned memory; the event marks their end
            host = {p: out[p].float().to("cpu", non_blocking=True) for p in products}
            ready = torch.cuda.Event()
            ready.record()
            return EncodedBatch(host, ready)
    except torch.cuda.OutOfMemoryError:
        if len(x) <= min_batch:
            raise
    # out of memory; here the exception and the frames that held the batch's activations are gone
    on_device = out = None
    torch.cuda.empty_cache()
    half = len(x) // 2
    print(f"featurelt extract: CUDA out of memory at batch {len(x)}; retrying as 2 x {half}", file=sys.stderr)
    a = encode_batch(encoder, x[:half], products, device=device, prepare=prepare, min_batch=min_batch)
    b = encode_batch(encoder, x[half:], products, device=device, prepare=prepare, min_batch=min_batch)
    return EncodedBatch({p: torch.from_numpy(np.concatenate([a[p], b[p]])) for p in products})


def encode_batch(encoder: "Encoder", x: "torch.Tensor | list[torch.Tensor] | PackedImages", products: list[str], *, device: str,
                 prepare: Callable[[Any], "torch.Tensor"] | None = None,
                 min_batch: int = 1) -> dict[str, np.ndarray]:
    """Encode ``x`` [B,C,H,W] -> ``{product: float32 array [B, D]}`` (:func:`launch_batch`, then wait)."""
    return launch_batch(encoder, x, products, device=device, prepare=prepare, min_batch=min_batch).result()


def encoded(batches: Iterable[dict[str, Any]], encoder: "Encoder", products: list[str], *, device: str,
             prepare: Callable[[Any], "torch.Tensor"] | None, times: LoopTimes | None = None
             ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray] | None]]:
    """``(batch, {product: vectors})`` for each loader batch, in order (None where the batch has no
    images left). One batch stays in flight: batch i+1 is launched before the outputs of batch i are
    read back, so on CUDA the GPU encodes while the host turns the previous batch into Arrow rows,
    commits and waits for the loader. ``times`` accumulates the images / launch / device seconds."""
    times = times if times is not None else LoopTimes()
    clock = time.perf_counter

    def read_back(job: EncodedBatch | None) -> dict[str, np.ndarray] | None:
        t0 = clock()
        out = job.result() if job is not None else None
        times.device += clock() - t0
        return out

    held: tuple[dict[str, Any], EncodedBatch | None] | None = None
    source = iter(batches)
    while True:
        t0 = clock()
        batch = next(source, None)
        t1 = clock()
        times.images += t1 - t0
        if batch is None:
            break
        job = None if batch["x"] is None else launch_batch(encoder, batch["x"], products, device=device,
                                                           prepare=prepare)
        times.launch += clock() - t1
        if held is not None:
            yield held[0], read_back(held[1])
        held = (batch, job)
    if held is not None:
        yield held[0], read_back(held[1])
