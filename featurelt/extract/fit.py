"""Fitting stateful products (SAM ``pca_map``, METHODS.md section 2) on the train split, or restoring a set's basis."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from featurelt.extract.batches import view_batches
from featurelt.extract.device import progress_bar
from featurelt.extract.plan import plan_todo
from featurelt.extract.provenance import stored_fit_state
from featurelt.extract.views import ViewMaker
from featurelt.store import Store

if TYPE_CHECKING:
    import torch

    from featurelt.encoders.base import Encoder


def fit_encoder(store: Store, encoder: "Encoder", products: list[str], sets: dict[str, str], *, batch_size: int,
                 num_workers: int, device: str, limit: int | None, progress: bool = True) -> list[str]:
    """Fit the products that need it (SAM ``pca_map``, METHODS.md section 2) on the train split, or
    restore the fitted state stored with an existing set's provenance (same basis for later rows).
    ``progress``: a progress bar over the train images read for the fit."""
    need = [p for p in products if encoder.requires_fit(p)]
    if not need:
        return []
    for p in list(need):  # a set made earlier keeps its basis: later rows must use the same one
        state = stored_fit_state(store, sets[p], encoder.name, p)
        if state is not None:
            encoder.load_fit_state(p, state)
            need.remove(p)
    if not need:
        return []
    if store.count("samples", "split = 'train'") == 0:
        raise ValueError(f"encoder {encoder.name} product(s) {need} are fitted on the train split, but store "
                         f"{store.root} has no samples with split 'train'")
    plan = plan_todo(store, split="train", limit=limit, views=0, done={"fit": {}})
    make_view = ViewMaker(encoder.transform, views=0, augment=None, seed=0)
    bar = progress_bar(len(plan.positions), enabled=progress, desc=f"fit {encoder.name} {', '.join(need)}")

    def batches() -> Iterator["torch.Tensor"]:
        for b in view_batches(store.root, plan.samples_version, store.storage_options, plan, make_view,
                              batch_size=batch_size, views=0, num_workers=num_workers):
            bar.update(b["samples"])
            if b["x"] is not None:
                x = b["x"].to(device)
                yield x if make_view.finish is None else make_view.finish(x)

    import torch

    try:
        with torch.inference_mode():
            encoder.fit(batches())
    finally:
        bar.close()
    return need
