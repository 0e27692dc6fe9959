"""Benchmark: end-to-end ``featurelt extract`` throughput vs the raw encoder forward (issue 3, item 8).

For each encoder, in the same process and run:

* **forward** (the baseline): the same images, already decoded and preprocessed into one in-memory
  tensor, pushed through ``featurelt.extract.encode_batch`` (inference mode, autocast on CUDA) in
  batches of ``--batch-size``; img/s. The tensor holds the first ``--baseline-images`` images (a
  float32 224 px image is 0.6 MB) and the forward cycles through it until it has encoded as many
  images as extract does.
* **extract**: :func:`featurelt.extract.extract` on a store holding those images as PNG (or JPEG, ``--format``) bytes --
  read from Lance, decode + preprocess in DataLoader workers, encode, write Arrow batches and commit;
  img/s over the embedding loop (``ExtractResult.seconds``) and over the whole call (encoder build
  and planning included). Each run writes a fresh embedding set, so nothing is skipped.

Reports the median of ``--runs`` runs, the ratio extract/forward (target >= 0.85), and the peak RSS
of this process and of its worker processes.

``--memory 8192,65536`` also measures the peak RSS of ``extract`` alone (a fresh process per size)
over the first N images: flat across sizes means memory does not grow with the data set (item 3).

``--host-workers 0,2`` also times the host side alone (no encoder): the DataLoader stage that reads
rows from Lance and decodes, for each worker count, handing over the decoded ``uint8`` image (resize
on the device, featurelt's default), the resized ``uint8`` image (``--resize-on host``:
normalisation on the device) or ``float32`` (the whole transform in the workers); img/s after the
first batch (worker start-up excluded) and the time to the first batch. ``clip:ViT-B-32`` runs with random weights
(``untrained=True``): the timing does not depend on the weights.

    python bench/extract.py --images 256 --runs 3 --device cpu
    python bench/extract.py --images 4096 --device cuda --batch-size 256 --num-workers 8 --results bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from featurelt.data.images import encode_png, sample_id_for, sha256_hex
from featurelt.images.decode import load_sample_image
from featurelt.store import Store

from _results import replace_section  # bench/_results.py (scripts run as `python bench/NAME.py`)

SECTION = "## bench/extract.py"


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes (PIL, 4:2:0) of a HxWx3 uint8 array."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_store(root: Path, n: int, size: int, seed: int = 0, image_format: str = "png",
               max_size: int | None = None) -> Store:
    """A store with ``n`` random ``size``x``size`` RGB samples (split train), PNG or JPEG (quality 90);
    with ``max_size``, each image's height and width are drawn from ``size..max_size`` (a photo data
    set's mixed sizes)."""
    rng = np.random.default_rng(seed)
    encode = encode_png if image_format == "png" else encode_jpeg
    rows = []
    for i in range(n):
        h, w = (size, size) if max_size is None else rng.integers(size, max_size + 1, size=2)
        data = encode(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        rows.append({"sample_id": sample_id_for(data) + f"{i:06d}", "dataset": "bench", "split": "train",
                     "label": i % 10, "source": "original", "uri": None, "image": data,
                     "content_sha256": sha256_hex(data), "width": int(w), "height": int(h), "description": None})
    schema = pa.schema([("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
                        ("label", pa.int32()), ("source", pa.string()), ("uri", pa.string()),
                        ("image", pa.large_binary()), ("content_sha256", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("description", pa.string())])
    store = Store(root)
    with store.transaction("bench: random images") as tx:
        tx.append("samples", pa.Table.from_pylist(rows, schema=schema))
    return store


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident set size (MiB) of this process and of its (waited-for) children."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def bench_encoder(store: Store, name: str, *, images: int, batch_size: int, num_workers: int, device: str,
                  runs: int, untrained: bool, baseline_images: int = 4096, resize_on: str = "auto") -> dict:
    """Median forward and extract throughput of ``name`` over the first ``images`` samples of ``store``."""
    import torch

    from featurelt.encoders import build_encoder
    from featurelt.extract import encode_batch, extract, resolve_device

    dev = resolve_device(device)
    enc = build_encoder(name, device=dev, untrained=untrained)
    enc.to(dev)
    products = [p for p in enc.products if not enc.requires_fit(p)]  # SAM's pca_map is fitted per store first
    n = min(images, store.count("samples"))
    m = max(batch_size, min(n, baseline_images))
    rows = store.dataset("samples").to_table(columns=["sample_id", "image", "uri"], limit=m).to_pylist()  # first m only
    x_all = torch.stack([enc.preprocess(load_sample_image(r)) for r in rows])  # decoded + preprocessed in memory
    if dev.startswith("cuda"):
        x_all = x_all.pin_memory()
    batches = []  # (start in x_all, size): n images in batches of batch_size, cycling through x_all
    for done in range(0, n, batch_size):
        size = min(batch_size, n - done)
        batches.append((done % (x_all.shape[0] - size + 1), size))

    def forward() -> float:
        t0 = time.perf_counter()
        for start, size in batches:
            encode_batch(enc, x_all[start:start + size], products, device=dev)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    forward()  # warm-up (kernels, allocator)
    extract(store, name, products=products, name=f"bench_warmup_{time.time_ns()}", limit=batch_size, batch_size=batch_size,
            num_workers=num_workers, device=dev, untrained=untrained, resize_on=resize_on,
            progress=False)  # lazy imports, fork server
    fwd, e2e_loop, e2e_call = [], [], []
    ratios_loop, ratios_call = [], []
    for r in range(runs):
        before = forward()
        t0 = time.perf_counter()
        res = extract(store, name, products=products, name=f"bench_{r}_{time.time_ns()}", limit=n, batch_size=batch_size,
                      num_workers=num_workers, resize_on=resize_on,
                      device=dev, untrained=untrained, progress=False,
                      message=f"bench extract {name}")
        call = time.perf_counter() - t0
        if res.samples_embedded != n or res.rejected:
            raise RuntimeError(f"extract embedded {res.samples_embedded} of {n} samples ({res.rejected} rejected)")
        after = forward()
        # the baseline brackets the extract run (mean of before and after), so drifting load on a shared
        # machine affects both sides of the ratio alike; the ratio is taken per run, then the median
        fwd.append((before + after) / 2)
        e2e_loop.append(res.images_per_second)
        e2e_call.append(n / call)
        ratios_loop.append(e2e_loop[-1] / fwd[-1])
        ratios_call.append(e2e_call[-1] / fwd[-1])
    f, lo, ca = statistics.median(fwd), statistics.median(e2e_loop), statistics.median(e2e_call)
    return {"encoder": name + (" (random weights)" if untrained else ""), "images": n, "batch": batch_size,
            "workers": num_workers, "device": dev, "resize_on": resize_on, "forward": f, "extract_loop": lo, "extract_call": ca,
            "ratio_loop": statistics.median(ratios_loop), "ratio_call": statistics.median(ratios_call), "runs": runs,
            "all_forward": fwd, "all_loop": e2e_loop, "stages": res.times.summary(dev) if runs else ""}


def bench_host(store: Store, name: str, *, images: int, batch_size: int, workers: list[int], untrained: bool,
               repeats: int = 3) -> list[dict]:
    """Steady img/s of the decode stage alone (no encoder), uint8 vs float32 handover, per worker count."""
    from featurelt.encoders import build_encoder
    from featurelt.extract.batches import view_batches
    from featurelt.extract.plan import plan_todo
    from featurelt.extract.views import ViewMaker

    enc = build_encoder(name, device="cpu", untrained=untrained)
    plan = plan_todo(store, split=None, limit=images, views=0, done={"bench": {}})
    out = []
    for handover in ("decoded uint8", "resized uint8", "float32"):
        make_view = ViewMaker(enc.transform, views=0, augment=None, seed=0,
                              resize_on_device=handover == "decoded uint8")
        if handover == "float32":  # the whole transform in the workers
            make_view.preprocess, make_view.finish, make_view.host = enc.transform, None, None
        for nw in workers:
            steadies, firsts = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                first, count = None, 0
                for b in view_batches(store.root, plan.samples_version, None, plan, make_view, batch_size=batch_size,
                                      views=0, num_workers=nw):
                    count += len(b["sample_id"])
                    if first is None:
                        first, first_count = time.perf_counter(), count
                steadies.append((count - first_count) / max(time.perf_counter() - first, 1e-9))
                firsts.append(first - t0)
            steady, first_s = statistics.median(steadies), statistics.median(firsts)
            out.append({"encoder": name, "handover": handover, "workers": nw,
                        "images": count, "steady": steady, "first_s": first_s, "repeats": repeats})
            print(f"host {name} {handover} workers={nw}: {steady:.0f} img/s after the first batch "
                  f"({first_s:.2f} s to the first batch; runs {['%.0f' % v for v in steadies]})", flush=True)
    return out


_MEMORY_CHILD = """
import json, sys, time
from featurelt.extract import extract
from featurelt.store import Store
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
res = extract(Store(a["root"]), a["encoder"], name=a["name"], limit=a["images"], batch_size=a["batch_size"],
              num_workers=a["num_workers"], device=a["device"], untrained=a["untrained"], progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of the (large) bench
# process would report the parent's peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "embedded": res.samples_embedded,
                  "img_s": res.images_per_second, "rss_mib": hwm / 1024}))
"""


def bench_memory(store: Store, name: str, sizes: list[int], *, batch_size: int, num_workers: int, device: str,
                 untrained: bool) -> list[dict]:
    """Peak RSS of ``extract`` over the first ``n`` samples, for each ``n`` in ``sizes``: each run in a
    fresh Python process (so the peak is extract's own: imports, encoder, loader, pending chunk),
    writing a fresh embedding set. Flat peaks across sizes = memory does not grow with the data set."""
    import json
    import subprocess

    out = []
    for n in sizes:
        args = {"root": str(store.root), "encoder": name, "name": f"bench_mem_{n}_{time.time_ns()}", "images": n,
                "batch_size": batch_size, "num_workers": num_workers, "device": device, "untrained": untrained}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"extract of {n} images failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if row["embedded"] != n:
            raise RuntimeError(f"extract embedded {row['embedded']} of {n} samples")
        row.update(encoder=name, images=n, batch=batch_size, workers=num_workers)
        out.append(row)
        print(f"memory {name} {n} images: peak RSS {row['rss_mib']:.0f} MiB, {row['img_s']:.0f} img/s", flush=True)
    return out


def md_table(intro: str, header: list[str], rows: list[list[object]]) -> str:
    """A paragraph and a markdown table under it."""
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def memory_markdown(rows: list[dict]) -> str:
    return md_table(
        "Peak RSS of `extract` by data set size (`--memory`): each run alone in a fresh process (its VmHWM; "
        "DataLoader workers, when there are any, are processes of their own), a fresh embedding set over the "
        "first `images` samples.",
        ["encoder", "images", "batch", "workers", "peak RSS MiB", "extract loop img/s"],
        [[r["encoder"], r["images"], r["batch"], r["workers"], f"{r['rss_mib']:.0f}", f"{r['img_s']:.0f}"] for r in rows])


def host_markdown(rows: list[dict]) -> str:
    return md_table(
        "Host side alone (`--host-workers`): Lance take + image decode (+ resize/crop, except for 'decoded', "
        "which leaves it to the device) in DataLoader workers, no encoder; median of 3 passes of img/s after the "
        "first batch, and of the time to the first batch (worker start-up; the first loader of a process also "
        "starts the fork server).",
        ["encoder", "handover", "workers", "images", "img/s (steady)", "first batch (s)"],
        [[r["encoder"], r["handover"], r["workers"], r["images"], f"{r['steady']:.0f}", f"{r['first_s']:.2f}"]
         for r in rows])


def markdown(rows: list[dict], args: argparse.Namespace, rss: tuple[float, float], machine: str) -> str:
    cmd = "python bench/extract.py " + " ".join(sys.argv[1:])
    lines = [SECTION, "",
             f"Machine: {machine}. Command: `{cmd}`. Median of {args.runs} runs; each run: baseline forward over "
             f"the in-memory preprocessed tensor before and after `extract()` into a fresh set from the store "
             f"(random {args.size}x{args.size}" + (f" to {args.max_size}x{args.max_size}" if args.max_size else "")
             + f" {args.image_format.upper()}s; `images` per encoder). Ratio = extract / forward (target >= 0.85); "
             "`loop` times the embedding loop (read, decode, preprocess, encode, write, commit), `call` the "
             "whole call (encoder build and planning too). img/s columns are medians over runs; ratios are the "
             "median of the per-run ratios.", "",
             "| encoder | device | resize on | images | batch | workers | forward img/s | extract loop img/s | "
             "ratio loop | extract call img/s | ratio call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        resize = r["resize_on"]  # as asked (auto: device)
        lines.append(f"| {r['encoder']} | {r['device']} | {resize} | {r['images']} | {r['batch']} | {r['workers']} | "
                     f"{r['forward']:.1f} | {r['extract_loop']:.1f} | {r['ratio_loop']:.2f} | "
                     f"{r['extract_call']:.1f} | {r['ratio_call']:.2f} |")
    lines += [""] + [f"- {r['encoder']}, last run's {r['stages']}" for r in rows if r["stages"]]
    lines += ["", f"Peak RSS: {rss[0]:.0f} MiB (this process: both encoders, the in-memory tensors and the extract "
              f"runs), {rss[1]:.0f} MiB (largest child process).", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="number of images in the benchmark store (default 256)")
    p.add_argument("--size", type=int, default=64, help="side of the random images in pixels (default 64)")
    p.add_argument("--max-size", type=int, default=None,
                   help="draw each image's height and width from --size..--max-size (mixed sizes, as photo data "
                   "sets have; the batches then go over as lists of images)")
    p.add_argument("--format", dest="image_format", choices=["png", "jpeg"], default="png",
                   help="how the images are stored (default png; jpeg: quality 90, 4:2:0, as most photo data sets)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of both measurements (default 64)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers for extract (default: featurelt's, 0 on cpu, min(8, cores - 1) on cuda)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="encoder device (default auto)")
    p.add_argument("--baseline-images", type=int, default=4096,
                   help="distinct images in the baseline's in-memory tensor, which the forward cycles through "
                   "(default 4096)")
    p.add_argument("--resize-on", choices=["auto", "host", "device"], default="auto",
                   help="extract's --resize-on (default auto: device)")
    p.add_argument("--runs", type=int, default=5,
                   help="runs per encoder; the median is reported (default 5; 0 = only --host-workers)")
    p.add_argument("--encoders", nargs="+", default=["clip:ViT-B-32", "clip:tiny=8192"], metavar="NAME[=IMAGES]",
                   help="encoders to time, each optionally with its own image count (default clip:ViT-B-32 with "
                   "random weights over --images, and clip:tiny over 8192 images: it embeds 256 images in about "
                   "40 ms, so that few would time the fixed cost of the run's last commit more than the loop)")
    p.add_argument("--host-workers", default=None, metavar="N,N",
                   help="also time the host side alone (decode stage, no encoder) for these worker counts")
    p.add_argument("--memory", default=None, metavar="N,N",
                   help="also measure extract's peak RSS (each in a fresh process) over the first N images, for "
                   "each N (the store holds the largest N): flat = memory does not grow with the data set")
    p.add_argument("--machine", default=None, help="machine label for RESULTS.md (default: hostname, cores)")
    p.add_argument("--results", type=Path, default=None,
                   help="replace the '## bench/extract.py' section of this RESULTS.md with the table")
    args = p.parse_args(argv)

    import torch

    machine = args.machine or (f"{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
                               + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    if args.num_workers is None:
        from featurelt.extract import default_num_workers, resolve_device

        args.num_workers = default_num_workers(resolve_device(args.device))
    rows = []
    with tempfile.TemporaryDirectory(prefix="featurelt-bench-") as tmp:
        wanted = [(e.split("=")[0], int(e.split("=")[1]) if "=" in e else args.images) for e in args.encoders]
        sizes = [int(v) for v in args.memory.split(",")] if args.memory else []
        store = make_store(Path(tmp) / "store", max([n for _, n in wanted] + sizes), args.size,
                           image_format=args.image_format, max_size=args.max_size)
        for name, n in wanted if args.runs else []:  # --runs 0: the host side only
            untrained = not name.endswith(":tiny") and not name.startswith("pixels")
            row = bench_encoder(store, name, images=n, batch_size=args.batch_size, num_workers=args.num_workers,
                                device=args.device, runs=args.runs, untrained=untrained,
                                baseline_images=args.baseline_images, resize_on=args.resize_on)
            rows.append(row)
            print(f"{row['encoder']}: forward {row['forward']:.1f} img/s, extract loop {row['extract_loop']:.1f} img/s "
                  f"(ratio {row['ratio_loop']:.2f}), call {row['extract_call']:.1f} img/s (ratio {row['ratio_call']:.2f}); "
                  f"runs forward={['%.1f' % v for v in row['all_forward']]} loop={['%.1f' % v for v in row['all_loop']]}; "
                  f"last run's {row['stages']}", flush=True)
        host = []
        if args.host_workers:
            for name, n in wanted:
                host += bench_host(store, name, images=n, batch_size=args.batch_size,
                                   workers=[int(w) for w in args.host_workers.split(",")],
                                   untrained=not name.endswith(":tiny") and not name.startswith("pixels"))
        memory = []
        for name, _ in wanted if sizes else []:
            from featurelt.extract import resolve_device

            memory += bench_memory(store, name, sizes, batch_size=args.batch_size, num_workers=args.num_workers,
                                   device=resolve_device(args.device),
                                   untrained=not name.endswith(":tiny") and not name.startswith("pixels"))
    rss = peak_rss_mib()
    text = (markdown(rows, args, rss, machine) if rows else "") + ("\n" + host_markdown(host) if host else "") \
        + ("\n" + memory_markdown(memory) if memory else "")
    print(text)
    if args.results:
        replace_section(args.results, SECTION, text)
        print(f"updated {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
