"""The head registry, the context every head is built from, and the common base class."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Iterable

from torch import Tensor, nn

from featurelt._registry import Registry

HEADS: Registry = Registry("head")


@dataclass(frozen=True)
class HeadContext:
    """What a head may know about its inputs and label space."""

    in_dims: list[int]                      # D of each cached source, in --features order (sum = D_total)
    num_classes: int                        # K: target + auxiliary classes (logit columns)
    text_embeddings: Tensor | None = None   # [K, Dt] class text embeddings (row y = label y), or None

    def __post_init__(self) -> None:
        if not self.in_dims or any(int(d) <= 0 for d in self.in_dims):
            raise ValueError(f"in_dims must be a non-empty list of positive ints, got {self.in_dims!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        t = self.text_embeddings
        if t is not None and (t.ndim != 2 or t.shape[0] != self.num_classes):
            raise ValueError(f"text_embeddings must be [K={self.num_classes}, Dt], got shape={tuple(t.shape)}")

    @property
    def in_dim(self) -> int:
        """D_total = sum of in_dims."""
        return int(sum(self.in_dims))

    def require_text(self, head: str) -> Tensor:
        """The text embeddings, or a ``ValueError`` telling the user to pass --text-set."""
        if self.text_embeddings is None:
            raise ValueError(f"head '{head}' needs class text embeddings: pass --text-set NAME "
                             "(a set_name of the text_embeddings table, made by `featurelt extract text:...`)")
        return self.text_embeddings


class Head(nn.Module, metaclass=abc.ABCMeta):
    """Base class: ``forward`` = ``classify(features(x))``; subclasses define both halves.

    Most heads are trained by gradient descent. A head with ``fitted = True`` (``knn``, ``ncm``) is
    instead made in one pass over the train rows by :meth:`fit`, and has no parameters: train-head
    then runs no epochs, and the loss, sampler and optimizer do not apply.

    ``standardize_input``: whether train-head's ``--standardize auto`` feeds this head standardised
    features ``(x - mean) / std`` (train-split statistics, per dimension). True for heads that learn their
    classifier from scratch (linear, mlp, fusion, cosine with random rows): frozen encoders' features often
    share one large mean direction with little spread around it (the tiny test encoders: std / |mean|
    below 0.01), which leaves gradient descent on the raw features predicting one class. False where the
    raw geometry is the method (text-aligned heads, kNN / NCM); the text-aligned heads adapter and
    lfm-projection standardise only their learned part (``takes_input_statistics``).
    """

    fitted: ClassVar[bool] = False
    standardize_input: bool = False
    # heads that keep the raw features for a zero-shot start but standardise their learned part themselves
    # (adapter, lfm-projection): train-head hands them the statistics via set_input_statistics(mean, std)
    takes_input_statistics: ClassVar[bool] = False

    def set_input_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Heads with ``takes_input_statistics``: per-dimension train mean and std [D] of the features."""
        raise TypeError(f"head {type(self).__name__} does not take input statistics")

    def __init__(self, ctx: HeadContext) -> None:
        super().__init__()
        self.in_dims = [int(d) for d in ctx.in_dims]
        self.num_classes = int(ctx.num_classes)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != sum(self.in_dims):
            raise ValueError(f"{type(self).__name__} expects features [B, {sum(self.in_dims)}], got shape={tuple(x.shape)}")

    @abc.abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns [B, D_latent], the latent the classifier reads."""

    def classify(self, z: Tensor) -> Tensor:
        """z: [B, D_latent] from :meth:`features`. Returns [B, K] logits.

        Heads whose logits need more than the latent (fusion mixes in the first source) override
        :meth:`logits_and_features` instead and do not use this method.
        """
        raise TypeError(f"{type(self).__name__} computes its logits in logits_and_features(), not from the latent alone")

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, D_total]. Returns (logits [B, K], latent [B, D_latent]) in one pass."""
        self.check_input(x)
        z = self.features(x)
        return self.classify(z), z

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns [B, K] logits."""
        return self.logits_and_features(x)[0]

    def tau_normalised_logits(self, x: Tensor, tau: float) -> Tensor:
        """Heads with a linear classifier (linear, mlp): logits with tau-normalised rows (section 1)."""
        raise ValueError(f"tau-normalisation (--tau-norm) needs a head whose classifier is one linear layer "
                         f"(linear, mlp), not {type(self).__name__}")

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Fitted heads only: make the classifier from ``(features [B, D_total], labels [B])`` batches
        that cover the train rows once."""
        raise TypeError(f"head {type(self).__name__} is trained by gradient descent, not fitted")


def unit(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def check_tau(name: str, tau: float) -> float:
    if not float(tau) > 0:
        raise ValueError(f"head option {name} must be > 0, got {tau!r}")
    return float(tau)


__all__ = ["HEADS", "HeadContext", "Head", "unit", "check_tau"]
