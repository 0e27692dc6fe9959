"""Writes jobs/tiny-data/{auxiliary,generated}: the small image folders the recipes' tiny jobs ingest.

aux-nine/hooked-seven/*.png, aux-eight/closed-four/*.png
                         two auxiliary classes of 8x8 digit-like images (noisy 7s and 4s), 40 each:
                         ingested with --source auxiliary --neighbor-of nine / eight;
generated/<class>/*.png  30 "generated" images for each of the two rarest classes (noisy 8s and 9s) and
                         10 off-class ones (noisy 1s filed as 'eight') that filter-generated may reject.
Run: python jobs/tiny-data/make_tiny_data.py (deterministic; seed 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write(folder: Path, images: np.ndarray, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        noisy = np.clip(img * 16 + rng.normal(scale=12.0, size=img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy, mode="L").save(folder / f"{i:03d}.png", optimize=True)


def main() -> None:
    here = Path(__file__).parent
    digits = load_digits()
    x, y = digits.images, digits.target
    rng = np.random.default_rng(0)
    write(here / "aux-nine" / "hooked-seven", x[y == 7][:40], rng)
    write(here / "aux-eight" / "closed-four", x[y == 4][:40], rng)
    write(here / "generated" / "eight", np.concatenate([x[y == 8][-30:], x[y == 1][:10]]), rng)
    write(here / "generated" / "nine", x[y == 9][-30:], rng)


if __name__ == "__main__":
    main()
