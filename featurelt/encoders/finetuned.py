"""``finetuned:<run_id>`` / ``finetuned:latest``: a fine-tune run's backbone as a frozen encoder of its store.

``featurelt extract finetuned:<run_id>`` embeds samples (e.g. ones ingested after the run) into the run's
embedding set ``ft_<run_id>`` (table ``emb_ft_<run_id>``), incrementally like every encoder: the rows carry
the fingerprint ``finetune --export`` writes (:func:`featurelt.finetune.export.export_fingerprint`: run id,
checkpoint sha256, evaluation preprocessing), so samples the export (or an earlier extract) embedded are skipped.

The run is looked up in the store's ``finetune_runs`` table (``latest``: the newest finished run); it must be
finished, and its checkpoint (``<store>/checkpoints/<run_id>/last.pt``, or ``--out-dir``'s) must still have
the sha256 the run recorded. The model is rebuilt from the checkpoint's saved config exactly as
:func:`featurelt.finetune.train.finetune` builds it (``build_backbone`` with the run's backbone, pretrained
tag / checkpoint, image size and seed, then ``apply_adapt``: LoRA layers included) and the checkpoint's
``backbone.*`` weights are loaded strictly (the EMA weights when the run used ``--ema``: the weights the export
forwards). The product ``embedding`` is ``FinetuneModel.features`` = the backbone's pooled feature (not
normalised), run under the run's ``--amp`` autocast and nothing else (as the export does, also on CUDA).
Preprocessing is the run's evaluation transform; ``extract --resize-on auto`` resizes on the host for this
encoder (``exact_resize``), so the vectors equal the export's (tested to 1e-5).

Refused with one line each: an unknown run id, an unfinished run, a missing or changed checkpoint, and runs of
recipe ``sam-fusion`` (their features need each sample's SAM map: use ``finetune --export``).
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import Encoder

FAMILY = "finetuned:<run_id>"
NEEDS_MAPS = ("sam-fusion",)  # recipes whose forward reads per-sample data beside the pixels


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def find_run(store: Any, run: str) -> dict[str, Any]:
    """The ``finetune_runs`` row of ``run`` (a run id, or ``latest``: the newest finished run); a ValueError
    naming the run otherwise."""
    if not store.has_table("finetune_runs"):
        raise ValueError(f"finetuned:{run}: store {store.root} has no fine-tune runs (table finetune_runs); "
                         f"run `featurelt finetune` first")
    if run == "latest":
        rows = store.sql("SELECT * FROM finetune_runs WHERE status = 'finished' ORDER BY time DESC LIMIT 1").to_pylist()
        if not rows:
            raise ValueError(f"finetuned:latest: store {store.root} has no finished fine-tune run (see featurelt runs)")
    else:
        rows = store.sql(f"SELECT * FROM finetune_runs WHERE run_id = {_lit(run)}").to_pylist()
        if not rows:
            known = store.sql("SELECT run_id FROM finetune_runs ORDER BY time DESC LIMIT 5").column("run_id").to_pylist()
            raise ValueError(f"finetuned:{run}: unknown fine-tune run in store {store.root}; newest runs: "
                             f"{', '.join(known)} (see featurelt runs)")
    row = rows[0]
    if row["status"] != "finished":
        raise ValueError(f"finetuned:{row['run_id']}: the run is {row['status']}, not finished: finish it with "
                         f"`featurelt finetune --resume {row['run_id']}` first")
    if not row["checkpoint"]:
        raise ValueError(f"finetuned:{row['run_id']}: the run recorded no checkpoint")
    return row


class FinetunedEncoder(Encoder):
    """A finished fine-tune run's backbone (module docstring): product ``embedding`` [B, D]."""

    family = "finetuned"
    exact_resize: ClassVar[bool] = True

    def __init__(self, run: str, *, store: Any, device: str | torch.device = "cpu") -> None:
        import yaml

        from featurelt.encoders.weights import file_sha256
        from featurelt.finetune import checkpoint as ckpt
        from featurelt.finetune.adapt import apply_adapt
        from featurelt.finetune.backbones import build_backbone
        from featurelt.finetune.config import from_dict
        from featurelt.finetune.export import export_fingerprint, run_provenance

        row = find_run(store, run)
        run_id, path = row["run_id"], row["checkpoint"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"finetuned:{run_id}: checkpoint {path} of the run is missing")
        sha = file_sha256(path)
        if row["checkpoint_sha256"] and sha != row["checkpoint_sha256"]:
            raise ValueError(f"finetuned:{run_id}: checkpoint {path} has sha256 {sha[:12]}..., the run recorded "
                             f"{row['checkpoint_sha256'][:12]}...: the file changed after the run")
        state = ckpt.load(path)
        cfg = from_dict(yaml.safe_load(state["config"]) or {}, source=f"checkpoint {path}")
        if cfg.recipe in NEEDS_MAPS:
            raise ValueError(f"finetuned:{run_id}: recipe {cfg.recipe}'s features need each sample's SAM map beside "
                             f"its pixels; this encoder has only the pixels: use `featurelt finetune --export`")
        backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                  image_size=cfg.image_size, seed=cfg.seed)
        apply_adapt(backbone, cfg.adapt, last_n=cfg.last_n, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets)
        weights = state["model"]
        if cfg.ema and state.get("ema") is not None:  # ModelEmaV3's state: the model's under "module."
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
        own = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        try:
            backbone.module.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ValueError(f"finetuned:{run_id}: checkpoint {path} does not fit the backbone rebuilt from its "
                             f"config ({cfg.backbone}, --adapt {cfg.adapt}): {first}") from None
        self.run_id, self.cfg, self.backbone = run_id, cfg, backbone
        self._run_prov = run_provenance(run_id, cfg=cfg, backbone=backbone, checkpoint=path, checkpoint_sha256=sha)
        self._fingerprint = export_fingerprint(run_id, sha, self._run_prov["preprocessing"])
        super().__init__(f"finetuned:{run_id}", products={"embedding": int(backbone.feature_dim)},
                         transform=backbone.transform, image_size=backbone.image_size, checkpoint=None,
                         trained=True, seed=cfg.seed, device=device)
        self.checkpoint, self.checkpoint_sha256 = path, sha
        self._set_model(backbone.module)

    def architecture(self) -> dict[str, Any]:
        return {"finetune_run": self.run_id, "backbone": self.backbone.name, "adapt": self.cfg.adapt,
                "recipe": self.cfg.recipe, "backbone_architecture": self.backbone.provenance.get("architecture"),
                "feature_dim": self.products["embedding"]}

    def preprocessing(self) -> dict[str, Any]:
        return self._run_prov["preprocessing"]

    def provenance(self) -> dict[str, Any]:
        """:meth:`Encoder.provenance` with the run's entries (those ``finetune --export`` records)."""
        return {**super().provenance(), **self._run_prov}

    def fingerprint(self, product: str) -> str:
        """The export's fingerprint (module docstring)."""
        self._check_product(product)
        return self._fingerprint

    def default_set_name(self, product: str) -> str:
        """``ft_<run_id>``: the set ``finetune --export`` writes."""
        self._check_product(product)
        return f"ft_{self.run_id}"

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]`` normalised. Returns ``{"embedding": [B, D]}`` float32: the backbone's pooled feature
        under the run's ``--amp`` autocast only (extract's own CUDA autocast switched off when ``--amp off``)."""
        from featurelt.finetune.train import _autocast

        self._select(products)
        x = self._check_input(x)
        amp = self.cfg.amp
        with (_autocast(self.device, amp) if amp != "off" else torch.autocast(self.device.type, enabled=False)):
            return {"embedding": self.model(x).float()}


def build_finetuned(run: str, *, store: Any = None, checkpoint: Any = None, device: str | torch.device = "cpu",
                    map_size: int = 16, image_size: int | None = None, seed: int = 0,
                    untrained: bool = False) -> FinetunedEncoder:
    """Factory of ``finetuned:<run>``: the weights, size and seed are the run's, so ``checkpoint``,
    ``image_size`` and ``untrained`` are refused; ``store`` is required."""
    given = [f for f, on in (("--checkpoint", checkpoint is not None), ("--image-size", image_size is not None),
                             ("--untrained", untrained)) if on]
    if given:
        raise ValueError(f"finetuned:{run} takes its weights, image size and seed from the run: "
                         f"{', '.join(given)} do not apply")
    if store is None:
        raise ValueError(f"finetuned:{run} reads its run from a store: build_encoder(..., store=STORE)")
    return FinetunedEncoder(run, store=store, device=device)


def finetuned_spec(run: str) -> Any:
    """Registry entry of ``finetuned:<run>`` (resolved dynamically by ``ENCODERS.get``; nothing read yet)."""
    from featurelt.encoders import EncoderSpec

    if not run or not all(c.isalnum() or c in "_-" for c in run):
        raise KeyError(f"unknown encoder 'finetuned:{run}': name a fine-tune run id (featurelt runs) or latest")
    return EncoderSpec(f"finetuned:{run}", "image", f"fine-tune run {run}'s backbone: pooled embedding into "
                       f"ft_<run_id>", True, "run", lambda **kw: build_finetuned(run, **kw), None,
                       lambda m: {}, needs_store=True)


def family_spec() -> Any:
    """The ``finetuned:<run_id>`` entry `featurelt encoders` lists."""
    from featurelt.encoders import EncoderSpec

    def build(**kw: Any) -> Any:
        raise KeyError("'finetuned:<run_id>' is a family: name a fine-tune run, e.g. finetuned:latest "
                       "(`featurelt runs` lists them)")

    return EncoderSpec(FAMILY, "image", "a finished `featurelt finetune` run's backbone (finetuned:<run_id> or "
                       "finetuned:latest): pooled `embedding` into ft_<run_id>, the run's evaluation transform; "
                       "new samples only (the --export's rows are skipped)", True, "run", build, None, lambda m: {},
                       needs_store=True, notes="weights: the run's checkpoint (sha256 checked against finetune_runs); "
                       "not for sam-fusion runs (use finetune --export)")


__all__ = ["FinetunedEncoder", "build_finetuned", "finetuned_spec", "family_spec", "find_run"]
