"""The images extraction makes of a sample: view 0, and views 1..N RandAugment of strength view / N (section 5)."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

    from featurelt.images.decode import DecodedImage

RANDAUGMENT_NUM_OPS = 2  # ops per augmented view (METHODS.md section 5: "RandAugment, k ops")
RANDAUGMENT_BINS = 31  # magnitude bins 0..30; magnitude = round(strength * 30)
AUGMENTS = ("randaugment",)


def view_strength(view: int, views: int) -> float:
    """Augmentation strength of a view (METHODS.md section 5): 0 for view 0, ``view / views`` otherwise."""
    if view < 0 or view > views:
        raise ValueError(f"view must be in 0..{views}, got {view}")
    return 0.0 if view == 0 else view / views


def randaugment_magnitude(strength: float) -> int:
    """RandAugment magnitude (of 31 bins, 0..30) for a strength in [0, 1]: ``round(strength * 30)``."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    return int(round(strength * (RANDAUGMENT_BINS - 1)))


def view_seed(seed: int, sample_id: str, view: int) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class ViewMaker:
    """The ``make_image`` of extraction's loader (picklable: runs in DataLoader workers): a decoded
    sample -> the tensor of the view its plan entry asks for.

    When the encoder's transform splits (:func:`featurelt.images.transforms.split_transform`), workers
    only resize / crop and hand over ``uint8 [C, H, W]``; ``finish`` (to float, normalise) then runs
    on whole batches on the encoder's device. With ``resize_on_device`` the resize and crop move to
    ``finish`` too, and workers hand over the decoded image (plain PNG / JPEG decoded by torchvision
    when the sample needs view 0 only). Otherwise workers run the whole transform and ``finish`` is None.
    ``entry_views``: the view of each plan entry (None: all view 0), set by
    :func:`featurelt.extract.batches.view_batches`.
    """

    def __init__(self, transform: Callable[[Any], "torch.Tensor"], *, views: int, augment: str | None,
                 seed: int, resize_on_device: bool = False) -> None:
        from featurelt.images.transforms import split_transform

        stages = split_transform(transform, resize_on_device=resize_on_device)
        self.host = None if stages is None else stages[0]  # a HostStage: may decode plain files without PIL
        self.preprocess = transform if stages is None else stages[0]
        self.finish = None if stages is None else stages[1]
        self.resizes_on_device = stages is not None and stages[1].resize is not None
        self.views = views
        self.augment = augment
        self.seed = seed
        self.entry_views: np.ndarray | None = None

    def __call__(self, decoded: "DecodedImage", row: dict[str, Any], index: int) -> "torch.Tensor":
        """The image of plan entry ``index``: view 0 straight from the bytes when that is all the
        sample needs and the host stage can skip PIL (:meth:`~featurelt.images.transforms.HostStage.from_bytes`),
        else through PIL (:meth:`view`)."""
        ev = self.entry_views
        view = 0 if ev is None else int(ev[index])
        alone = view == 0 and (ev is None or index + 1 == len(ev) or ev[index + 1] == 0)  # views are ascending
        if alone and self.host is not None:
            direct = self.host.from_bytes(decoded.data)
            if direct is not None:
                return direct
        return self.view(decoded.pil(), row["sample_id"], view)

    def view(self, img: Any, sample_id: str, view: int) -> "torch.Tensor":
        """Decoded PIL image -> tensor of one view (RandAugment seeded by ``(seed, sample_id, view)``)."""
        if view == 0:
            return self.preprocess(img)
        import torch
        from torchvision.transforms import RandAugment

        aug = RandAugment(num_ops=RANDAUGMENT_NUM_OPS, magnitude=randaugment_magnitude(view_strength(view, self.views)),
                          num_magnitude_bins=RANDAUGMENT_BINS)
        state = torch.random.get_rng_state()
        torch.manual_seed(view_seed(self.seed, sample_id, view))
        try:
            out = aug(img)
        finally:
            torch.random.set_rng_state(state)
        return self.preprocess(out)
