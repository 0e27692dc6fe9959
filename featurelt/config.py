"""Run configurations: frozen dataclasses with a comment on every field, YAML in and out.

A run's configuration is resolved in this order (later wins, LIFT-style):
``TrainCfg()`` defaults < ``--config FILE`` (YAML written by a previous run, or by hand) < CLI flags.
The resolved config is stored in the ``runs`` table and written as ``config.yaml`` next to the
head checkpoint, so ``featurelt train-head --config <checkpoint dir>/config.yaml`` re-runs it.

Section numbers refer to ``../shared/METHODS.md``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from featurelt.data.features import StreamMode

Optimizer = Literal["sgd", "adam", "adamw"]
Device = Literal["auto", "cpu", "cuda"]
Standardize = Literal["auto", "on", "off"]
ProtoTerm = Literal["head", "tail-std", "tail-dist"]
PROTO_TERMS: tuple[str, ...] = ("head", "tail-std", "tail-dist")
# Peak learning rate per optimizer when --lr is not given. Measured on a long-tailed digits store (imbalance 10)
# with the features of every built-in encoder (pixels, clip:tiny, sam:tiny, dinov2:tiny), 30 epochs, heads
# standardised by default (TrainCfg.standardize): SGD at 0.1 trains linear / mlp / cosine / fusion heads on all
# four and beats 0.01 (the former default, which left linear heads on clip:tiny predicting one class); Adam at
# 0.01 is within a few points of it, at 0.001 it stays 10-30 points behind after 30 epochs.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01}


class ConfigRecord:
    """Conversion shared by the frozen ``*Cfg`` dataclasses (``TrainCfg``, ``FinetuneCfg``).

    Out: :meth:`to_dict` / :meth:`to_yaml`. In: :meth:`from_dict` / :meth:`from_yaml` coerce every value to
    its field's annotated type (YAML and CLI strings alike) and name the source of an unknown key;
    :meth:`merged` applies overrides (CLI flags), later wins, ``*_opts`` dicts merged key by key.
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) in field order, the form written to YAML."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (values coerced like YAML / CLI values)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Any:
        """An instance from a mapping; unknown keys are an error naming ``source`` and the known fields."""
        types_ = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; fields are {', '.join(names)}")
        return cls(**{k: _coerce(k, v, types_[k]) for k, v in norm.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        """Read a config written by :meth:`to_yaml` (or by hand; missing fields keep defaults)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def merged(self, overrides: Mapping[str, Any], *, source: str = "command line") -> Any:
        """A copy with every non-None value of ``overrides`` applied; ``*_opts`` dicts are merged key by key."""
        data = self.to_dict()
        for k, v in overrides.items():
            k = k.replace("-", "_")
            if v is None:
                continue
            if k.endswith("_opts") and isinstance(v, Mapping):
                data[k] = {**data.get(k, {}), **v}
            else:
                data[k] = v
        return type(self).from_dict(data, source=source)


@dataclass(frozen=True)
class TrainCfg(ConfigRecord):
    """Everything ``train-head`` needs; one flat record so each CLI flag maps to one field."""

    # --- inputs
    features: tuple[str, ...] = ()          # embedding sets (tables emb_<name>) joined on sample_id, in order; >= 1
    text_set: str | None = None             # text_embeddings.set_name for heads that read class text embeddings
    train_split: str = "train"              # samples.split the head trains on
    eval_split: str = "test"                # samples.split evaluated (original rows of target classes only)
    as_of: str | None = None                # store version number or tag every read is pinned to (None = latest)
    stream_features: StreamMode = "auto"    # auto: read batches from the store when the features would take over half
                                            # the available RAM; always: always; never: always load them into memory
    # --- head (registry featurelt.heads.HEADS)
    head: str = "linear"                    # head name: linear | cosine | adapter | lfm-projection | fusion | mlp | ncm | knn
    head_opts: dict[str, Any] = field(default_factory=dict)     # keyword options of the head, e.g. {tau: 0.05}
    standardize: Standardize = "auto"       # feed the head (x - mean) / std (train-split statistics): auto = where the
                                            # head learns its classifier from scratch (Head.standardize_input); on; off
    # --- loss (registry featurelt.losses.LOSSES)
    loss: str = "ce"                        # loss name, e.g. ce | balanced-softmax | ldam | ns-ce (sections 1, 3, 5)
    loss_opts: dict[str, Any] = field(default_factory=dict)     # keyword options of the loss, e.g. {lambda_s: 0.1}
    # --- prototype add-on (section 2)
    proto: tuple[str, ...] = ()             # prototype terms switched on: subset of head, tail-std, tail-dist; () = off
    proto_m: int = 64                       # memory bank size M per class (FIFO), >= 1 features
    proto_tau_head: float = 0.5             # L_head applies when w_y < tau_head; w_y in (0, 1]
    proto_tau_tail_std: float = 0.5         # L_tail-std applies when w_y > tau_tail_std
    proto_tau_tail_dist: float = 0.5        # L_tail-dist applies when w_y > tau_tail_dist
    proto_beta: float = 1e-4                # weight of L_proto in the total loss, >= 0 (1e-4 ImageNet-LT, 1e-3 iNat18)
    # --- sampler (registry featurelt.samplers.SAMPLERS)
    sampler: str = "instance"               # sampler name: instance | class-balanced | sqrt | lfm | balancemix | momentum
    sampler_opts: dict[str, Any] = field(default_factory=dict)  # keyword options of the sampler, e.g. {alpha: 1.0}
    aux_cap: int = 50                       # at most this many samples per auxiliary class per epoch (section 3), >= 0
    # --- optimisation
    epochs: int = 30                        # passes of the sampler, >= 1
    batch_size: int = 256                   # samples per step, >= 1
    lr: float | None = None                 # peak learning rate, > 0; cosine-annealed to 0 over the epochs;
                                            # None = DEFAULT_LR of the optimizer (sgd 0.1, adam / adamw 0.01)
    optimizer: Optimizer = "sgd"            # sgd (with momentum) | adam | adamw
    momentum: float = 0.9                   # SGD momentum in [0, 1); ignored by adam / adamw
    weight_decay: float = 5e-4              # L2 / decoupled weight decay, >= 0
    seed: int = 0                           # seeds torch, numpy, python and the sampler; same seed + as_of = same run
    device: Device = "auto"                 # auto = cuda when available, else cpu
    # --- evaluation
    post_hoc_tau: float = 0.0               # post-hoc logit adjustment z_j - tau log n_j at inference (section 1); 0 = off
    tau_norm: float = 0.0                   # tau-normalisation at inference: rows w_k / ||w_k||^tau, no bias (section 1;
                                            # heads linear, mlp); 0 = off, 1 = unit rows
    # --- outputs
    out_dir: str | None = None              # checkpoint + config.yaml directory (default <store>/checkpoints/<run_id>)

    def __post_init__(self) -> None:
        check(self)

    @property
    def effective_lr(self) -> float:
        """``lr``, or the optimizer's default (:data:`DEFAULT_LR`) when it is None."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)



def check(cfg: TrainCfg) -> None:
    """Refuse values outside their documented ranges, naming the field and the value."""
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"config field '{name}' {why}, got {getattr(cfg, name)!r}")

    for name in ("epochs", "batch_size", "proto_m"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be >= 1")
    if cfg.aux_cap < 0:
        raise bad("aux_cap", "must be >= 0")
    if cfg.lr is not None and not cfg.lr > 0:
        raise bad("lr", "must be > 0")
    for name in ("weight_decay", "proto_beta", "post_hoc_tau", "tau_norm"):
        if getattr(cfg, name) < 0:
            raise bad(name, "must be >= 0")
    if not 0 <= cfg.momentum < 1:
        raise bad("momentum", "must be in [0, 1)")
    if cfg.optimizer not in typing.get_args(Optimizer):
        raise bad("optimizer", f"must be one of {', '.join(typing.get_args(Optimizer))}")
    if cfg.standardize not in typing.get_args(Standardize):
        raise bad("standardize", f"must be one of {', '.join(typing.get_args(Standardize))}")
    if cfg.device not in typing.get_args(Device):
        raise bad("device", f"must be one of {', '.join(typing.get_args(Device))}")
    if cfg.stream_features not in typing.get_args(StreamMode):
        raise bad("stream_features", f"must be one of {', '.join(typing.get_args(StreamMode))}")
    unknown = [t for t in cfg.proto if t not in PROTO_TERMS]
    if unknown:
        raise bad("proto", f"has unknown term(s) {unknown}; terms are {', '.join(PROTO_TERMS)}")
    if len(set(cfg.features)) != len(cfg.features):
        raise bad("features", "names an embedding set twice")


# ---------------------------------------------------------------------- parsing values
def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML or a CLI string) as the field's type; ``ValueError`` names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field '{name}' must be a list, got {value!r}")
        return tuple(str(v) for v in value)
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"config field '{name}' must be a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config field '{name}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field '{name}' must be {tp.__name__}, got {value!r}") from None
    return value


def read_yaml(path: Path, what: str) -> Any:
    """``yaml.safe_load`` of a file; unreadable text or bad YAML is a ValueError naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a YAML file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML{where}: {problem}") from None


def parse_value(text: str) -> Any:
    """A CLI option value (``k=v`` of --head-opt & co.) parsed as YAML: ``0.1`` -> float, ``true`` -> bool."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def from_dict(data: Mapping[str, Any], *, source: str = "config") -> TrainCfg:
    """``TrainCfg`` from a mapping; unknown keys are an error naming ``source`` and the known fields."""
    return TrainCfg.from_dict(data, source=source)


def from_yaml(path: str | Path) -> TrainCfg:
    """Read a config written by :meth:`TrainCfg.to_yaml` (or by hand; missing fields keep defaults)."""
    return TrainCfg.from_yaml(path)


def merge(base: TrainCfg, overrides: Mapping[str, Any], *, source: str = "command line") -> TrainCfg:
    """``base`` with every non-None value of ``overrides`` applied; ``*_opts`` dicts are merged key by key."""
    return base.merged(overrides, source=source)


def resolve(*, config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainCfg:
    """Defaults < ``config_file`` < ``overrides`` (CLI flags that were given)."""
    cfg = from_yaml(config_file) if config_file else TrainCfg()
    return merge(cfg, overrides or {})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainCfg)]


__all__ = ["TrainCfg", "from_dict", "from_yaml", "merge", "resolve", "parse_value", "field_names", "PROTO_TERMS"]
