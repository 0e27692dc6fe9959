"""Benchmark: the fine-tuning read path (store loader + TrainTransform) against torchvision ImageFolder + PIL (issue 16, "Performance").

Sections (``--sections``, comma-separated; default ``loader,reference,step,memory``):

* ``loader``: images/s of one training epoch over the same JPEG photos, the same augmentation
  (RandomResizedCrop(``--image-size``) + horizontal flip, uint8 out, no normalisation) and the same
  number of DataLoader workers: featurelt's :class:`~featurelt.images.loader.StoreImageLoader` over a
  store holding the JPEG bytes, with :class:`~featurelt.images.augment.TrainTransform`, against
  torchvision's ``ImageFolder`` (PIL decode) + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
  ``PILToTensor`` over a folder of the same files. Runs alternate (baseline, store, baseline, ...);
  median of ``--runs`` epochs per side, ratio = store / baseline. Two figures per side: the whole
  epoch (worker start-up included) and after the first batch (steady).
* ``reference``: the same with a store that holds only the files' paths (``ingest --reference``).
* ``step``: step efficiency of a small CNN (timm ``--step-model``, random init) on ``--device``:
  images/s of ``--steps`` SGD steps fed by the store loader (uint8 batches, normalised on the device)
  against the same steps over one in-memory uint8 batch; ratio = loader / in-memory (target >= 0.9).
* ``memory``: peak RSS of one loader epoch (fresh process per size, 2 workers) over stores of
  ``--memory-rows`` small images: the process's and its largest worker's peak (VmHWM / ru_maxrss of the
  waited-for workers); flat across sizes = the loader does not grow with the data set.
* ``gpu`` (``--device cuda``, when a GPU is lent): the ``loader`` comparison's store side feeding a
  ``--gpu-model`` step on the GPU in bf16, with CPU decode and with ``--gpu-decode`` (workers read and
  crop-plan, ``torchvision.io.decode_jpeg(device="cuda")`` decodes on the GPU); images/s, ratio to the
  in-memory step, peak GPU memory.

The photos: ``--images`` synthetic JPEGs (quality 90, 4:2:0) of ``--min-size``..``--max-size`` px
per side, "photo-like": three octaves of smooth colour noise (random 4x4, 16x16 and 64x64 grids
upscaled bicubically) over a gradient, plus per-pixel grain, so that they compress like photos
(45 KB on average at 300-500 px) rather than like noise or flat colour. Files are kept in ``--workdir``
(made once per parameter set).

    python bench/finetune.py --images 4000 --runs 5 --workers 2
    python bench/finetune.py --sections step --step-model resnet18 --steps 20
    python bench/finetune.py --sections memory --memory-rows 10000,100000
    python bench/finetune.py --sections gpu --device cuda --workers 12 --images 2000 --gpu-decode --steps 20 --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from featurelt.store.schema import arrow_schema
from _results import replace_section  # bench/_results.py (scripts run as `python bench/NAME.py`)

SECTION = "## bench/finetune.py"
SAMPLES_SCHEMA = arrow_schema("samples")


# ---------------------------------------------------------------------------------------------- data
def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 [h, w, 3]: smooth colour noise at three scales over a gradient, plus grain."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (rng.random(3) * 255)[None, None, :] * (0.5 + 0.5 * (xx / w)[..., None]) * 0.4
    for grid, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
        small = Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8))
        img = img + weight * np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += 6 * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_photos(workdir: Path, n: int, min_size: int, max_size: int, classes: int = 10, seed: int = 0) -> Path:
    """``workdir/photos-N-MIN-MAX/cK/IIIIII.jpg`` (ImageFolder layout), made once; returns the folder."""
    folder = workdir / f"photos-{n}-{min_size}-{max_size}"
    done = folder / "DONE"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(n):
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        path = folder / f"c{i % classes}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(photo(rng, h, w)))
    done.write_text(f"{n}\n")
    print(f"made {n} JPEGs in {folder} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return folder


def make_store(root: Path, folder: Path, *, reference: bool) -> Path:
    """A store whose ``samples`` hold the JPEG bytes of ``folder`` (or, ``reference``, only their paths)."""
    from featurelt.data.images import sha256_hex
    from featurelt.images.decode import plain_image_size
    from featurelt.store import Store

    if (root / "DONE").exists():
        return root
    rows = []
    for path in sorted(folder.glob("c*/*.jpg")):
        data = path.read_bytes()
        w, h = plain_image_size(data)
        rows.append({"sample_id": f"bench:{path.parent.name}/{path.name}", "dataset": "bench", "split": "train",
                     "label": int(path.parent.name[1:]), "source": "original",
                     "uri": str(path.resolve()) if reference else None, "image": None if reference else data,
                     "content_sha256": sha256_hex(data), "width": w, "height": h, "description": None})
    store = Store(root)
    with store.transaction("bench: photos") as tx:
        tx.append("samples", pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
    (root / "DONE").write_text(f"{len(rows)}\n")
    return root


def make_small_store(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """A store of ``n`` small ``size`` px JPEGs (8 distinct images, each row with its own id), for the memory section."""
    from featurelt.data.images import sha256_hex
    from featurelt.store import Store

    if (root / "DONE").exists():
        return root
    rng = np.random.default_rng(seed)
    pool = [encode_jpeg(photo(rng, size, size)) for _ in range(8)]
    store = Store(root)
    with store.transaction("bench: small photos") as tx:
        def batches():
            for start in range(0, n, 10_000):
                ids = range(start, min(n, start + 10_000))
                data = [pool[i % 8] for i in ids]
                yield pa.RecordBatch.from_pylist(
                    [{"sample_id": f"s{i:07d}", "dataset": "bench", "split": "train", "label": i % 10,
                      "source": "original", "uri": None, "image": d, "content_sha256": sha256_hex(d),
                      "width": size, "height": size, "description": None} for i, d in zip(ids, data)],
                    schema=SAMPLES_SCHEMA)
        tx.append("samples", batches())
    (root / "DONE").write_text(f"{n}\n")
    return root


def epoch_plan(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """A shuffled epoch of ``n`` rows in batches (what a sampler plans)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------- loaders
def imagefolder_loader(folder: Path, *, image_size: int, batch_size: int, workers: int, seed: int):
    """The baseline: torchvision ImageFolder + PIL, RandomResizedCrop + flip, uint8 out."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def store_loader(root: Path, *, image_size: int, batch_size: int, workers: int, seed: int, epoch: int = 0,
                 augment: str = "flip-crop", limit: int | None = None, gpu_decode: bool = False, pin: bool = False):
    """featurelt's read path: StoreImageLoader over a shuffled plan, TrainTransform in the workers
    (``gpu_decode``: EncodedJpeg, the workers only draw the crops; :func:`decode_on_device` decodes)."""
    from featurelt.images.augment import EncodedJpeg, TrainTransform
    from featurelt.images.loader import StoreImageLoader
    from featurelt.store import Store

    store = Store(root)
    n = store.count("samples") if limit is None else min(limit, store.count("samples"))
    t = TrainTransform(image_size, augment, seed=seed)  # type: ignore[arg-type]
    t.set_epoch(epoch)
    return StoreImageLoader(store.root, store.dataset("samples").version, None, epoch_plan(n, batch_size, seed + epoch),
                            EncodedJpeg(t) if gpu_decode else t, columns=("label",), num_workers=workers,
                            pin_memory=pin)


def decode_on_device(batch, loader, size: int, device: str):
    """uint8 [B, 3, size, size] on ``device`` from an EncodedJpeg batch (torchvision.io.decode_jpeg there)."""
    return loader.make_image.finish(batch.images, batch.extras, device=device)


def time_epoch(loader, images_of) -> dict:
    """Wall time of one pass: whole, to the first batch, and images/s after the first batch."""
    t0 = time.perf_counter()
    first = None
    count = first_count = 0
    for batch in loader:
        count += images_of(batch)
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    return {"images": count, "whole": count / (end - t0), "steady": (count - first_count) / max(end - first, 1e-9),
            "first_s": first - t0}


def bench_loader(folder: Path, root: Path, args: argparse.Namespace, label: str) -> dict:
    # warm-up, not timed: the fork server of the store loader (started once per process), the page cache
    for i, _ in enumerate(imagefolder_loader(folder, image_size=args.image_size, batch_size=args.batch_size,
                                             workers=args.workers, seed=0)):
        if i == 2 * args.workers:
            break
    for _ in store_loader(root, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers, seed=0,
                          limit=2 * args.workers * args.batch_size):
        pass
    base, ours = [], []
    for r in range(args.runs):
        dl = imagefolder_loader(folder, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                                seed=r)
        base.append(time_epoch(dl, lambda b: len(b[1])))
        sl = store_loader(root, image_size=args.image_size, batch_size=args.batch_size, workers=args.workers, seed=r)
        ours.append(time_epoch(sl, lambda b: len(b)))
        print(f"{label} run {r}: ImageFolder {base[-1]['whole']:.0f} img/s whole, {base[-1]['steady']:.0f} steady; "
              f"store {ours[-1]['whole']:.0f} whole, {ours[-1]['steady']:.0f} steady "
              f"(first batch {base[-1]['first_s']:.2f} / {ours[-1]['first_s']:.2f} s)", flush=True)
    med = {k: (statistics.median(b[k] for b in base), statistics.median(o[k] for o in ours))
           for k in ("whole", "steady", "first_s")}
    return {"label": label, "images": ours[0]["images"], "runs": args.runs, "med": med,
            "ratio_whole": statistics.median(o["whole"] / b["whole"] for b, o in zip(base, ours)),
            "ratio_steady": statistics.median(o["steady"] / b["steady"] for b, o in zip(base, ours)),
            "all": ([round(b["whole"]) for b in base], [round(o["whole"]) for o in ours])}


def loader_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"One epoch of {rows[0]['images']} JPEG photos ({args.min_size}-{args.max_size} px per side, synthetic: "
             "smooth colour noise at three scales + grain, quality 90), RandomResizedCrop"
             f"({args.image_size}) + flip, uint8 out, batch {args.batch_size}, {args.workers} workers. Median of "
             f"{args.runs} alternating runs per side, after a few untimed batches of each (the store loader's "
             "fork server, imports); ratio = median of per-run store / ImageFolder; whole = the epoch's images / its wall time "
             "(worker start-up included), steady = after the first batch.", "",
             "| store | ImageFolder img/s (whole / steady) | store loader img/s (whole / steady) | ratio whole | "
             "ratio steady | first batch s (IF / store) | runs whole img/s (IF / store) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["med"]
        lines.append(f"| {r['label']} | {m['whole'][0]:.0f} / {m['steady'][0]:.0f} | {m['whole'][1]:.0f} / "
                     f"{m['steady'][1]:.0f} | **{r['ratio_whole']:.2f}x** | {r['ratio_steady']:.2f}x | "
                     f"{m['first_s'][0]:.2f} / {m['first_s'][1]:.2f} | {r['all'][0]} / {r['all'][1]} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- step
def normalise(x, mean, std):
    """uint8 [B, 3, H, W] -> float32, / 255, ImageNet mean / std (what the device stage does)."""
    import torch

    return (x.to(torch.float32, memory_format=torch.contiguous_format) / 255.0 - mean) / std


def bench_step(root: Path, args: argparse.Namespace, device: str, model_name: str, *, amp: bool = False,
               gpu_decode: bool = False) -> dict:
    """images/s of SGD steps of ``model_name`` fed by the store loader against the same steps over one
    in-memory batch; steady state (the first ``warmup`` steps of each side are not timed)."""
    import timm
    import torch

    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    name, _, adapt = model_name.partition(":")
    model = timm.create_model(name, pretrained=False, num_classes=10)
    if adapt == "lora":  # peft LoRA on the attention and MLP projections, the head trained in full
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "proj", "fc1", "fc2"],
                                                 modules_to_save=["head"]))
    elif adapt:
        raise ValueError(f"unknown adaptation {adapt!r} in {model_name!r} (known: lora)")
    model = model.to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 1.0
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 1.0
    warmup, steps, size = 2, args.steps, args.step_image_size

    def step(x, y) -> None:
        x = normalise(x.to(device, non_blocking=True), mean, std)
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                            enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    n = (warmup + steps) * args.batch_size
    loader_runs, memory_runs, stalls, first_s = [], [], [], []
    for r in range(args.runs):
        # the real loader: uint8 batches from the workers, normalised here
        loader = store_loader(root, image_size=size, batch_size=args.batch_size, workers=args.workers, seed=r,
                              limit=n, gpu_decode=gpu_decode, pin=device.startswith("cuda") and not gpu_decode)
        t0 = time.perf_counter()
        wait = 0.0
        it = iter(loader)
        for i in range(warmup + steps):
            w0 = time.perf_counter()
            b = next(it)
            if i >= warmup:
                wait += time.perf_counter() - w0
            if i == 0:
                first_s.append(time.perf_counter() - t0)
                first = b
            x = decode_on_device(b, loader, size, device) if gpu_decode else b.images
            step(x, torch.as_tensor(b.columns["label"], dtype=torch.long))
            if i == warmup - 1:
                sync()
                t1 = time.perf_counter()
        sync()
        elapsed = time.perf_counter() - t1
        del it
        loader_runs.append(steps * args.batch_size / elapsed)
        stalls.append(wait / elapsed)
        # the same steps over one in-memory batch (decoded once)
        x_mem = (decode_on_device(first, loader, size, device) if gpu_decode else first.images).clone()
        y_mem = torch.as_tensor(first.columns["label"], dtype=torch.long)
        if device.startswith("cuda"):
            x_mem, y_mem = x_mem.to(device), y_mem.to(device)
        for i in range(warmup + steps):
            step(x_mem, y_mem)
            if i == warmup - 1:
                sync()
                t1 = time.perf_counter()
        sync()
        memory_runs.append(steps * args.batch_size / (time.perf_counter() - t1))
        print(f"step {model_name} {device} run {r}: loader {loader_runs[-1]:.1f} img/s, in-memory {memory_runs[-1]:.1f} "
              f"img/s (ratio {loader_runs[-1] / memory_runs[-1]:.2f}; waiting for the loader {stalls[-1]:.1%} of the "
              f"time; first batch {first_s[-1]:.2f} s)", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"model": model_name, "device": device, "amp": amp, "gpu_decode": gpu_decode, "image_size": size,
            "loader": statistics.median(loader_runs), "memory": statistics.median(memory_runs),
            "ratio": statistics.median(a / b for a, b in zip(loader_runs, memory_runs)),
            "stall": statistics.median(stalls), "first_s": statistics.median(first_s), "peak_gib": peak,
            "all": ([round(v, 1) for v in loader_runs], [round(v, 1) for v in memory_runs])}


def step_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Step efficiency: {args.steps} timed SGD steps (after 2 untimed) of batch {args.batch_size}, "
             f"RandomResizedCrop(image size) + flip from the store loader ({args.workers} workers, uint8, normalised "
             "in the main process) against the same steps over one in-memory uint8 batch; random-init timm models. "
             "Ratio = median of per-run loader img/s / in-memory img/s (target >= 0.9); stall = time waiting for "
             "the next batch / step time.", "",
             "| model | device | precision | decode | image size | loader img/s | in-memory img/s | ratio | stall | "
             "first batch s | peak GPU GiB | runs (loader / in-memory) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['device']} | {'bf16' if r['amp'] else 'fp32'} | "
                     f"{'GPU' if r['gpu_decode'] else 'CPU workers'} | {r['image_size']} | {r['loader']:.1f} | "
                     f"{r['memory']:.1f} | **{r['ratio']:.2f}** | {r['stall']:.1%} | {r['first_s']:.2f} | "
                     f"{'' if r['peak_gib'] is None else round(r['peak_gib'], 1)} | {r['all'][0]} / {r['all'][1]} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import finetune as fb
a = json.loads(sys.argv[1])

def tree():
    # this process's descendants (fork server, its loader workers): pid -> parent pid from /proc
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, todo = [], [os.getpid()]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found

def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0

loader = fb.store_loader(fb.Path(a["root"]), image_size=a["image_size"], batch_size=a["batch_size"],
                         workers=a["workers"], seed=0)
t0 = time.perf_counter()
peaks, count = {}, 0
for i, b in enumerate(loader):
    count += len(b)
    if i % 8 == 0:
        for p in tree():
            peaks[p] = max(peaks.get(p, 0.0), hwm(p))
print(json.dumps({"rows": count, "seconds": time.perf_counter() - t0, "main_mib": hwm(os.getpid()),
                  "workers_mib": sorted(peaks.values())}))
"""


def bench_memory(args: argparse.Namespace) -> list[dict]:
    """Peak RSS of one loader epoch over stores of each ``--memory-rows`` size, each in a fresh process."""
    out = []
    for n in [int(v) for v in args.memory_rows.split(",")]:
        root = make_small_store(args.workdir / f"small-{n}.store", n)
        runs = []
        for _ in range(args.memory_runs):
            a = {"root": str(root), "image_size": 32, "batch_size": 256, "workers": args.workers}
            proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _MEMORY_CHILD, json.dumps(a)],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"memory run over {n} rows failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if row["rows"] != n:
                raise RuntimeError(f"the loader gave {row['rows']} of {n} rows")
            runs.append(row)
            print(f"memory {n} rows: main {row['main_mib']:.0f} MiB, workers {[round(v) for v in row['workers_mib']]}"
                  f" MiB, {row['rows'] / row['seconds']:.0f} img/s", flush=True)
        out.append({"rows": n, "main": statistics.median(r["main_mib"] for r in runs),
                    "worker": statistics.median(max(r["workers_mib"], default=0.0) for r in runs),
                    "tree": statistics.median(r["main_mib"] + sum(r["workers_mib"]) for r in runs),
                    "img_s": statistics.median(r["rows"] / r["seconds"] for r in runs), "runs": len(runs)})
    return out


def memory_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]
    lines = [f"Host memory by data set size: one loader epoch (TrainTransform flip-crop to 32 px, batch 256, "
             f"{args.workers} workers) over a store of N rows of 32 px JPEGs, in a fresh process per run; peak RSS "
             "(VmHWM) of the main process, of the largest loader worker, and the sum over the process tree (main, "
             f"fork server, workers; shared pages counted in each). Median of {args.memory_runs} runs; ratio = "
             f"tree peak / the {base['rows']}-row tree peak (target within 10 %).", "",
             "| rows | main MiB | largest worker MiB | tree MiB | ratio | loader img/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']} | {r['main']:.0f} | {r['worker']:.0f} | {r['tree']:.0f} | "
                     f"**{r['tree'] / base['tree']:.3f}** | {r['img_s']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="loader,reference,step,memory",
                   help="comma-separated: loader, reference, step, memory, gpu (default loader,reference,step,memory)")
    p.add_argument("--images", type=int, default=4000, help="JPEG photos in the loader sections (default 4000)")
    p.add_argument("--min-size", type=int, default=300, help="smallest photo side in px (default 300)")
    p.add_argument("--max-size", type=int, default=500, help="largest photo side in px (default 500)")
    p.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop output side (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides (default 2)")
    p.add_argument("--runs", type=int, default=5, help="epochs per side; medians are reported (default 5)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/featurelt-bench-finetune"),
                   help="where photos and stores are made once and kept (default /tmp/featurelt-bench-finetune)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="step / gpu sections' device (default cpu)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run in the step sections (default 10)")
    p.add_argument("--step-model", default="resnet18",
                   help="timm model (random init) of the step section (default resnet18)")
    p.add_argument("--step-image-size", type=int, default=128,
                   help="crop size of the step sections (default 128 on the CPU; the gpu section uses --image-size)")
    p.add_argument("--gpu-models", default="resnet50,vit_base_patch32_224:lora",
                   help="timm models of the gpu section, NAME[:lora] (default resnet50,vit_base_patch32_224:lora)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="gpu section: also run each model with JPEG decoding on the device (torchvision decode_jpeg)")
    p.add_argument("--memory-rows", default="10000,100000", help="store sizes of the memory section (default 10000,100000)")
    p.add_argument("--memory-runs", type=int, default=3, help="runs per size in the memory section (default 3)")
    p.add_argument("--machine", default=None, help="machine label for RESULTS.md (default: hostname, cores)")
    p.add_argument("--results", type=Path, default=None,
                   help="replace the '## bench/finetune.py' section of this RESULTS.md with the tables")
    args = p.parse_args(argv)
    import warnings

    # the ImageFolder baseline forks its workers (torch's default) from this process, which has imported lance
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"loader", "reference", "step", "memory", "gpu"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if "gpu" in sections and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device")

    import torch

    machine = args.machine or f"{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    texts = []
    loader_rows = []
    if "loader" in sections or "reference" in sections:
        folder = make_photos(args.workdir, args.images, args.min_size, args.max_size)
        for sec, reference in (("loader", False), ("reference", True)):
            if sec in sections:
                root = make_store(args.workdir / f"{folder.name}-{'ref' if reference else 'bytes'}.store", folder,
                                  reference=reference)
                loader_rows.append(bench_loader(folder, root, args, "uri files (--reference)" if reference
                                                else "JPEG bytes in the store"))
        texts.append(loader_markdown(loader_rows, args))
    photos_root = None
    if "step" in sections or "gpu" in sections:
        folder = make_photos(args.workdir, args.images, args.min_size, args.max_size)
        photos_root = make_store(args.workdir / f"{folder.name}-bytes.store", folder, reference=False)
    if "step" in sections:
        row = bench_step(photos_root, args, args.device, args.step_model)
        texts.append(step_markdown([row], args))
    if "gpu" in sections:
        rows = []
        size, args.step_image_size = args.step_image_size, args.image_size
        for model_name in args.gpu_models.split(","):
            rows.append(bench_step(photos_root, args, args.device, model_name, amp=True))
            if args.gpu_decode:
                rows.append(bench_step(photos_root, args, args.device, model_name, amp=True, gpu_decode=True))
        args.step_image_size = size
        texts.append("GPU section (bf16 autocast, channels-last on CUDA): " + step_markdown(rows, args))
    if "memory" in sections:
        texts.append(memory_markdown(bench_memory(args), args))
    text = f"{SECTION}\n\nMachine: {machine}. Command: `python bench/finetune.py {' '.join(sys.argv[1:])}`.\n\n" \
        + "\n".join(texts)
    print(text)
    if args.results:
        replace_section(args.results, SECTION, text)
        print(f"updated {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
