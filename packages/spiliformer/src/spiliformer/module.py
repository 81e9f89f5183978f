"""``SpiLiFormerClassifier``: spikecore's SpikingClassifier recipe with SpiLiFormer's two-pass loss.

``arch`` names the registered SpiLiFormer model (``spiliformer_4_384``, ``spiliformer_2_256_dvs``,
``spiliformer_10_768``: ``spiliformer.list_models("spiliformer_*")``), as ``arch`` names the registered
model in every package, and ``lateral_inhibition`` is the one switch between SpiLiFormer and its baseline,
everything else equal:

- ``lateral_inhibition: true``: FF-LiDiff / FB-LiDiff attention, the feedback generator (``aug``,
  ``decoder_order``, ``decoder_bn``, ``decoder_bn_first``, ``kv_diff``) and the loss
  ``(1 - beta) CE(logits1) + beta CE(logits2)``; evaluation uses logits2. ``beta`` is a number or a linear
  ramp ``{start: 0.5, end: 0.8}`` over the epochs (the CIFAR10-DVS code's ``Betascheduler``).
- ``lateral_inhibition: false``: the plain QKFormer the variant is built on (QKTA / SSA, no feedback, one
  pass) with the ordinary cross-entropy; the SpiLiFormer options are unused.
"""

from typing import Any, TypedDict

import torch
from torch import nn

from spikecore.train import SpikingClassifier

from .model import SpiLiFormer
from .registry import VARIANTS, create_model


class BetaRamp(TypedDict):
    """``beta`` rising linearly over training: ``start + (end - start) * epoch / max_epochs``."""

    start: float
    end: float


def beta_at(beta: "float | BetaRamp", epoch: int, max_epochs: int | None) -> float:
    """The loss weight of pass 2 in epoch ``epoch`` (0-based) of a run of ``max_epochs`` epochs.

    A number is constant. A ramp is updated once per epoch as the authors' ``Betascheduler`` (CIFAR10-DVS
    code): ``start`` in epoch 0, ``+ (end - start) / max_epochs`` per epoch, so ``end`` itself is reached
    only after the last epoch (their run: 0.5 to 0.7977 over 130 epochs). Without a known ``max_epochs``
    (no trainer, or ``max_epochs`` -1) it stays at ``start``.
    """
    if not isinstance(beta, dict):
        return float(beta)
    if not max_epochs or max_epochs < 0:
        return float(beta["start"])
    return float(beta["start"] + (beta["end"] - beta["start"]) * min(epoch, max_epochs) / max_epochs)


def _check_beta(beta: Any) -> None:
    from spikecore.errors import ConfigError

    values = [beta["start"], beta["end"]] if isinstance(beta, dict) else [beta]
    if not all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(
            f"model.beta weighs the two passes: a number in [0, 1] or {{start, end}} in [0, 1], got {beta!r}"
        )


class SpiLiFormerClassifier(SpikingClassifier):
    """Train / evaluate SpiLiFormer or its QKFormer baseline. See the module docstring; the remaining
    arguments are SpikingClassifier's (``num_classes``, ``T``, ``arch_kwargs`` for the backbone, the recipe).

    Args:
        arch: the registered SpiLiFormer model (a key of :data:`~spiliformer.registry.VARIANTS`).
        lateral_inhibition: SpiLiFormer (True) or the plain QKFormer baseline (False).
        beta: weight of the second pass in the loss (0.8 CIFAR, 0.5 ImageNet and N-Caltech101), or a
            linear ramp ``{"start": 0.5, "end": 0.8}`` over the epochs (CIFAR10-DVS); see :func:`beta_at`.
        aug: the feedback generator's factor (1.0; 2.0 for CIFAR-100).
        decoder_order: ``"backward"`` / ``"forward"`` decoder chain; None: the variant's (ImageNet forward).
        decoder_bn: BN in the decoders; None: the variant's (no BN on DVS).
        decoder_bn_first: ``BN -> Linear -> LIF`` decoders (the CIFAR-100 code) instead of
            ``Linear -> BN -> LIF``.
        kv_diff: the CIFAR10-DVS code's K^T V difference in the FB blocks (see the README).
        authors_compat: reproduce the authors' code where it departs from the paper (see
            :mod:`spiliformer.model`); what ``spiliformer convert --from authors`` sets.
    """

    registry = staticmethod(create_model)

    def __init__(
        self,
        arch: str = "spiliformer_4_384",
        lateral_inhibition: bool = True,
        beta: float | BetaRamp = 0.8,
        aug: float = 1.0,
        decoder_order: str | None = None,
        decoder_bn: bool | None = None,
        decoder_bn_first: bool = False,
        kv_diff: bool = False,
        authors_compat: bool = False,
        **kwargs: Any,
    ):
        _check_beta(beta)
        super().__init__(arch=arch, **kwargs)

    def build_network(self, arch: str, **kwargs: Any) -> nn.Module:
        if arch not in VARIANTS:
            raise ValueError(
                f"arch names a SpiLiFormer model ({', '.join(VARIANTS)}); lateral_inhibition: false "
                f"gives the QKFormer baseline it is built on, got {arch!r}"
            )
        hp = self.hparams
        if not hp.lateral_inhibition:
            return create_model(VARIANTS[arch].baseline, **kwargs)
        opts = dict(
            aug=hp.aug,
            decoder_order=hp.decoder_order,
            decoder_bn=hp.decoder_bn,
            decoder_bn_first=hp.get("decoder_bn_first", False),
            kv_diff=hp.kv_diff,
            authors_compat=hp.get("authors_compat", False),
        )
        return create_model(arch, **{k: v for k, v in opts.items() if v is not None}, **kwargs)

    @property
    def beta(self) -> float:
        """The pass-2 loss weight of the current epoch (a ramp follows the trainer's epochs)."""
        trainer = self._trainer
        max_epochs = trainer.max_epochs if trainer is not None else None
        return beta_at(self.hparams.beta, self.current_epoch, max_epochs)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.net, SpiLiFormer):
            return super().training_loss(x, target)
        logits1, logits2 = self.net.forward_passes(x)
        ce1, ce2 = self.cross_entropy(logits1, target), self.cross_entropy(logits2, target)
        self.log("train/ce_pass1", ce1.detach(), on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/ce_pass2", ce2.detach(), on_step=False, on_epoch=True, sync_dist=True)
        beta = self.beta
        if isinstance(self.hparams.beta, dict):
            self.log("train/beta", beta, on_step=False, on_epoch=True, sync_dist=False)
        return (1 - beta) * ce1 + beta * ce2, logits2
