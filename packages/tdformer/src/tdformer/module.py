"""``TDFormerClassifier``: spikecore's SpikingClassifier recipe with TDFormer's feedback and segment loss.

``arch`` names the registered TDFormer model (``tdformer_spikformer_4_384``, ``tdformer_sdt_2_512``,
``tdformer_qkformer_hst_4_384``, ...: ``tdformer.list_models("tdformer_*")``), as ``arch`` names the
registered model in every package, and ``feedback`` is the one switch between TDFormer and its baseline,
everything else equal:

- ``feedback: true``: the backbone (stateful neurons) inside :class:`TDFormer` with ``segments``,
  ``control``, ``feedback_blocks``, ``pm_clamp``, ``pm_channel_mixer``, ``carry_state`` and the PM's
  neuron ``pm_neuron`` (a :class:`spikecore.NeuronConfig`, a ``pm_neuron:`` section in YAML; or the older
  ``pm_tau``, ``pm_v_threshold``, ``pm_v_reset``, ``pm_detach_reset``, ``pm_surrogate``, ``pm_alpha``,
  see :class:`~tdformer.model.TDFormer`); the loss is
  sum_n alpha_n CE(y, O_n) (``segment_weights`` alpha, normalised to sum 1; default alpha_n proportional to
  n, so the last segment weighs most), and evaluation uses O_N.
- ``feedback: false``: the plain backbone the model is built on (``tdformer_X`` -> ``X``) and the ordinary
  cross-entropy (the TDFormer options are unused).

Before ``arch`` named the model, tdformer's ``arch`` named the backbone (``arch: spikformer_4_384``). Such
a value, in an old config or in a checkpoint's saved hyper-parameters, still builds the same network: it
is read as ``tdformer_spikformer_4_384`` with a ``FutureWarning`` (:func:`model_name`).
"""

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from spikecore import NeuronConfig
from spikecore.errors import ConfigError
from spikecore.train import SpikingClassifier

from .registry import BACKBONES, MODELS, PREFIX, create_model


def model_name(arch: str, warn: bool = True) -> str:
    """``arch`` in its current meaning, the registered model name: a bare backbone name (tdformer's
    ``arch`` before it named the model) becomes ``tdformer_<backbone>``, with a ``FutureWarning``."""
    if arch in BACKBONES:
        if warn:
            warnings.warn(
                f"arch: {arch} names a backbone, what tdformer's arch meant before it named the registered "
                f"model; read as arch: {PREFIX + arch} (feedback: false still gives the plain {arch}). "
                "Write the model name in configs.",
                FutureWarning,
                stacklevel=3,
            )
        return PREFIX + arch
    return arch


class TDFormerClassifier(SpikingClassifier):
    """Train / evaluate TDFormer or its baseline. See the module docstring; ``arch`` is the registered
    TDFormer model, the remaining arguments are SpikingClassifier's (``num_classes``, ``T``,
    ``arch_kwargs`` for the backbone, the recipe)."""

    def __init__(
        self,
        arch: str = "tdformer_spikformer_4_384",
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
        pm_neuron: NeuronConfig | None = None,
        **kwargs: Any,
    ):
        arch = model_name(arch)
        super().__init__(arch=arch, **kwargs)
        if pm_neuron is not None:  # saved as plain values (checkpoints are read with weights_only)
            self._update_saved_hparams(pm_neuron=NeuronConfig.coerce(pm_neuron).to_dict())
        self.segment_weights = self._weights(segment_weights)

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's hyper-parameters in this version's meaning: an ``arch`` that names a backbone
        (tdformer's ``arch`` before it named the model) becomes the TDFormer model's name; a checkpoint
        without ``pm_neuron`` had the PM's neuron in its ``pm_*`` options."""
        hparams = super().upgrade_hparams(hparams)
        hparams.setdefault("pm_neuron", None)
        if isinstance(hparams.get("arch"), str):
            hparams["arch"] = model_name(hparams["arch"], warn=False)
        return hparams

    def build_network(self, arch: str, **kwargs: Any) -> nn.Module:
        if not arch.startswith(PREFIX) or arch not in MODELS:
            raise ValueError(
                f"arch names a TDFormer model ({', '.join(m for m in MODELS if m.startswith(PREFIX))}); "
                f"feedback: false gives the backbone it is built on, got {arch!r}"
            )
        hp = self.hparams
        if not hp.feedback:
            return create_model(arch.removeprefix(PREFIX), **kwargs)
        td = dict(
            segments=hp.segments,
            control=hp.control,
            feedback_blocks=hp.feedback_blocks,
            pm_clamp=tuple(hp.pm_clamp),
            pm_channel_mixer=hp.pm_channel_mixer,
            carry_state=hp.carry_state,
            **self._pm_neuron(),
        )
        return create_model(arch, **td, **kwargs)

    def _pm_neuron(self) -> dict[str, Any]:
        """The PM's neuron for TDFormer: ``pm_neuron``, or the ``pm_*`` options (not both)."""
        hp = self.hparams
        loose = {k: hp.get(k, p.default) for k, p in _PM_OPTIONS.items()}
        if hp.get("pm_neuron") is None:
            return loose
        changed = sorted(k for k, v in loose.items() if v != _PM_OPTIONS[k].default)
        if changed:
            raise ConfigError(
                f"model.pm_neuron and model.{', model.'.join(changed)} both set the processing module's "
                "neuron: give its settings in model.pm_neuron only"
            )
        try:
            return {"pm_neuron": NeuronConfig.coerce(hp.pm_neuron)}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.pm_neuron: {err}") from None

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


# The PM's neuron in its older spelling: option name -> its parameter (its default means "not set").
_PM_OPTIONS = {
    k: p
    for k, p in inspect.signature(TDFormerClassifier.__init__).parameters.items()
    if k in ("pm_tau", "pm_v_threshold", "pm_v_reset", "pm_detach_reset", "pm_surrogate", "pm_alpha")
}
