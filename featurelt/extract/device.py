"""Where and how visibly extraction runs: the device, the default number of loader workers, the progress bar."""
from __future__ import annotations

import os
from typing import Any


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return device


def default_num_workers(device: str) -> int:
    """DataLoader workers when not given: 0 on CPU (the encoder's threads use the cores), else
    ``min(8, cores - 1)`` so that decoding keeps up with the GPU."""
    if not device.startswith("cuda"):
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def progress_bar(total: int, *, enabled: bool, desc: str) -> Any:
    """A tqdm bar over ``total`` images (disabled: counts silently)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
