"""``SpiLiFormerClassifier``: spikecore's SpikingClassifier recipe with SpiLiFormer's two-pass loss.

``arch`` names a SpiLiFormer variant (``spiliformer_4_384``, ``spiliformer_2_256_dvs``,
``spiliformer_10_768``) and ``lateral_inhibition`` is the one switch between SpiLiFormer and its baseline,
everything else equal:

- ``lateral_inhibition: true``: FF-LiDiff / FB-LiDiff attention, the feedback generator (``aug``,
  ``decoder_order``, ``decoder_bn``, ``kv_diff``) and the loss ``(1 - beta) CE(logits1) + beta CE(logits2)``;
  evaluation uses logits2.
- ``lateral_inhibition: false``: the plain QKFormer the variant is built on (QKTA / SSA, no feedback, one
  pass) with the ordinary cross-entropy; the SpiLiFormer options are unused.
"""

from typing import Any

import torch
from torch import nn

from spikecore.train import SpikingClassifier

from .model import SpiLiFormer
from .registry import VARIANTS, create_model


class SpiLiFormerClassifier(SpikingClassifier):
    """Train / evaluate SpiLiFormer or its QKFormer baseline. See the module docstring; the remaining
    arguments are SpikingClassifier's (``arch``, ``num_classes``, ``T``, ``arch_kwargs`` for the backbone,
    the recipe).

    Args:
        lateral_inhibition: SpiLiFormer (True) or the plain QKFormer baseline (False).
        beta: weight of the second pass in the loss (0.8 CIFAR / DVS, 0.5 ImageNet).
        aug: the feedback generator's factor (1.0; 2.0 for CIFAR-100).
        decoder_order: ``"backward"`` / ``"forward"`` decoder chain; None: the variant's (ImageNet forward).
        decoder_bn: BN in the decoders; None: the variant's (no BN on DVS).
        kv_diff: the DVS code's K^T V difference in the FB blocks (see the README on its parameter count).
    """

    registry = staticmethod(create_model)

    def __init__(
        self,
        lateral_inhibition: bool = True,
        beta: float = 0.8,
        aug: float = 1.0,
        decoder_order: str | None = None,
        decoder_bn: bool | None = None,
        kv_diff: bool = False,
        **kwargs: Any,
    ):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta weighs the two passes and must be in [0, 1], got {beta}")
        super().__init__(**kwargs)

    def build_network(self, arch: str, **kwargs: Any) -> nn.Module:
        if arch not in VARIANTS:
            raise ValueError(
                f"arch names a SpiLiFormer variant ({', '.join(VARIANTS)}); lateral_inhibition: false "
                f"gives its QKFormer baseline, got {arch!r}"
            )
        hp = self.hparams
        if not hp.lateral_inhibition:
            return create_model(VARIANTS[arch].baseline, **kwargs)
        opts = dict(aug=hp.aug, decoder_order=hp.decoder_order, decoder_bn=hp.decoder_bn, kv_diff=hp.kv_diff)
        return create_model(arch, **{k: v for k, v in opts.items() if v is not None}, **kwargs)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.net, SpiLiFormer):
            return super().training_loss(x, target)
        logits1, logits2 = self.net.forward_passes(x)
        ce1, ce2 = self.cross_entropy(logits1, target), self.cross_entropy(logits2, target)
        self.log("train/ce_pass1", ce1.detach(), on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/ce_pass2", ce2.detach(), on_step=False, on_epoch=True, sync_dist=True)
        beta = self.hparams.beta
        return (1 - beta) * ce1 + beta * ce2, logits2
