"""Which backbone parameters train: ``apply_adapt(backbone, mode, ...)`` for full | lora | last-n | ln | bias | frozen.

* ``full``   -- every backbone parameter;
* ``lora``   -- peft LoRA adapters (``peft.inject_adapter_in_model``, in place: parameter names keep their
  paths, adapted layers gain ``base_layer`` / ``lora_A`` / ``lora_B``) on the Linear / Conv / MultiheadAttention
  modules named by ``targets`` (default :data:`featurelt.finetune.backbones.LORA_TARGETS`: timm ViTs ``qkv``,
  ``proj``, ``fc1``, ``fc2``; ResNets the block convolutions; open_clip the MLP ``c_fc`` / ``c_proj``); only
  ``lora_`` parameters train. open_clip's attention is ``nn.MultiheadAttention``, whose ``out_proj`` is never
  called as a module (a LoRA on it alone would do nothing); ``--lora-targets attn,c_fc,c_proj`` adapts it with
  peft's (experimental) MultiheadAttention LoRA, which adapts the packed in-projection and ``out_proj`` but
  merges the update into the frozen weights for each forward and takes it out again: the frozen weights then
  drift by float rounding (~1e-8 per step, tests/test_finetune_adapt.py), which is why it is not the default;
* ``last-n`` -- the parameters of the last ``n`` layer groups (``Backbone.layers``);
* ``ln``     -- the affine parameters of normalisation layers (LayerNorm, BatchNorm, GroupNorm, SAM's LayerNorm2d);
* ``bias``   -- every parameter named ``bias``;
* ``frozen`` -- none (the head alone trains).

The head's parameters always train. Returns the names of the trainable backbone parameters.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from featurelt.finetune.backbones import Backbone

ADAPT_MODES = ("full", "lora", "last-n", "ln", "bias", "frozen")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or \
        type(module).__name__.lower().endswith(("norm", "norm2d"))


def apply_adapt(backbone: Backbone, mode: str, *, last_n: int = 1, lora_rank: int = 8, lora_alpha: float = 16.0,
                lora_dropout: float = 0.0, lora_targets: Sequence[str] = ()) -> list[str]:
    """Set ``requires_grad`` on ``backbone.module``'s parameters for ``mode`` (module docstring); LoRA
    modifies the module in place. Returns the trainable parameter names."""
    module = backbone.module
    if mode not in ADAPT_MODES:
        raise ValueError(f"unknown --adapt '{mode}'; choose from {', '.join(ADAPT_MODES)}")
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = list(lora_targets or backbone.lora_targets)
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, nn.Embedding)  # what peft's LoRA adapts
        # the full names of the modules that LoRA adapts: a target name may also name a container (timm's stem
        # ``conv1`` Sequential), which is left out
        chosen = [n for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, kinds)
                  and not any(n.startswith(o + ".") for o, om in module.named_modules()
                              if o and isinstance(om, nn.MultiheadAttention) and o != n)]
        missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in chosen)]
        if missing:
            raise ValueError(f"--lora-targets {','.join(missing)}: no Linear / Conv / MultiheadAttention module of "
                             f"{backbone.name} is called so (default for this backbone: {','.join(backbone.lora_targets)})")
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=chosen)
        inject_adapter_in_model(config, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        module.requires_grad_(mode == "full")
        if mode == "last-n":
            if last_n < 1:
                raise ValueError(f"--last-n must be >= 1, got {last_n}")
            wanted = {n for layer in backbone.layers[-last_n:] for n in layer}
            for name, p in module.named_parameters():
                p.requires_grad_(name in wanted)
        elif mode == "bias":
            for name, p in module.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
        elif mode == "ln":
            for m in module.modules():
                if _is_norm(m):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)
    return [n for n, p in module.named_parameters() if p.requires_grad]


__all__ = ["apply_adapt", "ADAPT_MODES"]
