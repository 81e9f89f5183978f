"""``TDFormerClassifier``: spikecore's SpikingClassifier recipe with TDFormer's feedback and segment loss.

``arch`` names the backbone (``spikformer_4_384``, ``sdt_2_512``, ``qkformer_hst_4_384``, ...) and
``feedback`` is the one switch between the baseline and TDFormer, everything else equal:

- ``feedback: true``: the backbone (stateful neurons) inside :class:`TDFormer` with ``segments``,
  ``control``, ``feedback_blocks``, ``pm_clamp``, ``pm_channel_mixer``, ``carry_state`` and the PM's
  neuron ``pm_tau``, ``pm_v_threshold``, ``pm_v_reset``, ``pm_detach_reset``, ``pm_surrogate``,
  ``pm_alpha`` (see :class:`~tdformer.model.TDFormer`); the loss is
  sum_n alpha_n CE(y, O_n) (``segment_weights`` alpha, normalised to sum 1; default alpha_n proportional to
  n, so the last segment weighs most), and evaluation uses O_N.
- ``feedback: false``: the plain backbone and the ordinary cross-entropy (the TDFormer options are unused).
"""

from typing import Any

import torch
from torch import nn

from spikecore.train import SpikingClassifier

from .registry import PREFIX, create_model


class TDFormerClassifier(SpikingClassifier):
    """Train / evaluate TDFormer or its baseline. See the module docstring; the remaining arguments are
    SpikingClassifier's (``arch``, ``num_classes``, ``T``, ``arch_kwargs`` for the backbone, the recipe)."""

    def __init__(
        self,
        feedback: bool = True,
        segments: int = 2,
        control: str = "cm1",
        feedback_blocks: list[int] | None = None,
        pm_clamp: tuple[float, float] = (0.0, 2.0),
        pm_channel_mixer: str = "depthwise",
        carry_state: bool = True,
        segment_weights: list[float] | None = None,
        pm_tau: float = 2.0,
        pm_v_threshold: float = 1.0,
        pm_v_reset: float | None = 0.0,
        pm_detach_reset: bool = True,
        pm_surrogate: str = "sigmoid",
        pm_alpha: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.segment_weights = self._weights(segment_weights)

    def build_network(self, arch: str, **kwargs: Any) -> nn.Module:
        if arch.startswith(PREFIX):
            raise ValueError(
                f"arch names the backbone; use arch: {arch.removeprefix(PREFIX)} with feedback: true "
                "(feedback: false gives the baseline)"
            )
        hp = self.hparams
        if not hp.feedback:
            return create_model(arch, **kwargs)
        td = dict(
            segments=hp.segments,
            control=hp.control,
            feedback_blocks=hp.feedback_blocks,
            pm_clamp=tuple(hp.pm_clamp),
            pm_channel_mixer=hp.pm_channel_mixer,
            carry_state=hp.carry_state,
            pm_tau=hp.pm_tau,
            pm_v_threshold=hp.pm_v_threshold,
            pm_v_reset=hp.pm_v_reset,
            pm_detach_reset=hp.pm_detach_reset,
            pm_surrogate=hp.pm_surrogate,
            pm_alpha=hp.pm_alpha,
        )
        return create_model(PREFIX + arch, **td, **kwargs)

    def _weights(self, weights: list[float] | None) -> list[float]:
        n = getattr(self.net, "segments", 1)
        if weights is None:
            weights = [float(i + 1) for i in range(n)]
        if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"segment_weights must be {n} non-negative numbers (one per segment), got {weights}"
            )
        total = float(sum(weights))
        return [w / total for w in weights]

    def training_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self.net, "forward_segments"):
            return super().training_loss(x, target)
        outs = self.net.forward_segments(x)
        losses = [self.cross_entropy(o, target) for o in outs]
        for n, part in enumerate(losses):
            self.log(f"train/loss_seg{n + 1}", part.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return sum(w * part for w, part in zip(self.segment_weights, losses, strict=True)), outs[-1]
