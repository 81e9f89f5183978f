"""``SpikingClassifier``: the papers' image-classification recipe as a LightningModule.

The network comes from a registry by name (``arch``) so that configs stay data. Inputs from the data
modules are ``[B, C, H, W]`` images (the network repeats them over its T steps: direct coding) or
``[B, T, C, H, W]`` event frames (turned into ``[T, B, C, H, W]`` here).

Subclasses change the objective by overriding :meth:`training_loss` (and :meth:`predict_logits` for what
evaluation uses), e.g. TDFormer's weighted per-segment losses.
"""

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..neuron.config import NEURON_FIELDS, NeuronConfig
from ..neuron.module import reset
from .schedule import warmup_cosine


class SpikingClassifier(pl.LightningModule):
    """Train / evaluate a registered spiking network on a classification data module.

    Args:
        arch: registered model name, the same registry everywhere: ``spikecore.models.list_models()``
            (spikecore's backbones and the installed packages' models, e.g. ``tdformer_spikformer_4_384``).
        num_classes: classes of the data (linked from the data module by the CLI).
        T: time steps a static image is repeated over (event frames bring their own T).
        arch_kwargs: further keyword arguments of the model builder (e.g. ``drop_path_rate``, ``segments``).
        lr, weight_decay, betas: AdamW; no weight decay on biases, norm weights and other 1-D parameters
            (timm's convention), nor on the parameters the network names in its ``no_weight_decay()``
            (timm's hook: names relative to the network, ``fnmatch`` patterns allowed).
        warmup_epochs, min_lr: linear warm-up, then cosine decay to ``min_lr``, updated every step.
        cooldown_epochs: the last epochs of the run held at ``min_lr`` (timm's scheduler cool-down: the
            cosine then reaches ``min_lr`` after ``max_epochs - cooldown_epochs`` epochs).
        label_smoothing: for the cross-entropy (and mixup's soft targets).
        mixup, cutmix: timm Mixup alphas (0 disables each); ``mixup_prob`` the chance a batch is mixed,
            ``mixup_switch_prob`` the chance of cutmix when both are on; ``mixup_off_epoch`` stops mixing
            from that epoch on (SpiLiFormer's recipe turns it off at 200).
        neuron: the network's neuron, a :class:`spikecore.NeuronConfig` (in YAML a ``neuron:`` section,
            ``{tau: 2.0, detach_reset: true, ...}``: the complete neuron, unset fields take NeuronConfig's
            defaults, which are ``lif_multi_step``'s, not the backbones' ``BACKBONE_NEURON``); given to the
            model builder as ``neuron=``. ``None``: the model's own default. Not together with a
            ``neuron`` or a neuron keyword (``tau``, ``backend``, ...) in ``arch_kwargs``.
    """

    def __init__(
        self,
        arch: str = "spikformer_4_384",
        num_classes: int = 10,
        T: int = 4,
        arch_kwargs: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.06,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 20.0,
        min_lr: float = 1e-5,
        cooldown_epochs: float = 0.0,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_off_epoch: int | None = None,
        init_weights: str | None = None,
        neuron: NeuronConfig | None = None,
    ):
        super().__init__()
        _check_recipe(
            T=T,
            num_classes=num_classes,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            cooldown_epochs=cooldown_epochs,
        )
        network_kwargs = _network_kwargs(arch_kwargs, neuron)
        self.save_hyperparameters()
        # LightningCLI hands its config's values to save_hyperparameters: save what this module was built
        # with (a subclass may pass arch on in its current meaning, e.g. tdformer's older backbone names),
        # and neurons as plain values (checkpoints are read with weights_only: no NeuronConfig objects).
        saved = dict(arch=arch, neuron=None if neuron is None else NeuronConfig.coerce(neuron).to_dict())
        if isinstance((arch_kwargs or {}).get("neuron"), NeuronConfig):
            saved["arch_kwargs"] = {**arch_kwargs, "neuron": arch_kwargs["neuron"].to_dict()}
        self._update_saved_hparams(**saved)
        self.net = self.build_network(arch, num_classes=num_classes, T=T, **network_kwargs)
        self.mixup_fn = self._make_mixup()
        self.accuracy = nn.ModuleDict(_accuracy_metrics(num_classes))
        if init_weights:
            self.load_initial_weights(init_weights)

    def _update_saved_hparams(self, **values: Any) -> None:
        """Replace saved hyper-parameters (those checkpoints keep and loggers report) by these values."""
        initial = getattr(self, "_hparams_initial", None)
        for key, value in values.items():
            self.hparams[key] = value
            if initial is not None and key in initial:
                initial[key] = value

    # -- hooks for subclasses ------------------------------------------------------------------------
    registry: Callable[..., nn.Module] | None = None  # a package's create_model (a staticmethod)

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's saved hyper-parameters in this version's meaning (a new dict). The CLI applies it
        before comparing them with the config and rebuilding the model; a subclass maps what an older
        version saved with another meaning (tdformer: ``arch`` that named the backbone). An option newer
        than the checkpoint gets the value that rebuilds what was saved, not the config's: a checkpoint
        without ``neuron`` had its neuron in ``arch_kwargs`` (or the model's default)."""
        hparams = dict(hparams)
        hparams.setdefault("neuron", None)
        return hparams

    def build_network(self, arch: str, **kwargs: Any) -> nn.Module:
        """The network ``arch`` from the package's registry (spikecore's shared backbones by default)."""
        if self.registry is None:
            from ..models import create_model

            return create_model(arch, **kwargs)
        return self.registry(arch, **kwargs)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) for a training batch; ``target`` is class indices or soft targets ``[B, K]``."""
        logits = self.net(x)
        return self.cross_entropy(logits, target), logits

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation and prediction."""
        return self.net(x)

    def load_initial_weights(self, path: str) -> None:
        """Weights of ``path`` (a checkpoint of ``fit`` or a plain state dict, read safely) into the network;
        a clear error if they do not fit."""
        from .checkpoint import load_state_dict_file, load_weights

        state = {k.removeprefix("net."): v for k, v in load_state_dict_file(path).items()}
        target = self.net
        backbone = getattr(self.net, "backbone", None)
        if backbone is not None and not any(k.startswith("backbone.") for k in state):
            target = backbone
        load_weights(target, {"state_dict": state}, path)

    # -- pieces --------------------------------------------------------------------------------------
    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 2:  # soft targets from mixup (label smoothing already in them)
            return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def _make_mixup(self):
        hp = self.hparams
        if hp.mixup <= 0 and hp.cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=hp.mixup,
            cutmix_alpha=hp.cutmix,
            prob=hp.mixup_prob,
            switch_prob=hp.mixup_switch_prob,
            label_smoothing=hp.label_smoothing,
            num_classes=hp.num_classes,
        )

    @staticmethod
    def to_time_major(x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` event frames -> ``[T, B, C, H, W]``; images pass through."""
        return x.transpose(0, 1).contiguous() if x.dim() == 5 else x

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        if self.mixup_fn is None or (
            hp.mixup_off_epoch is not None and self.current_epoch >= hp.mixup_off_epoch
        ):
            return x, y
        if x.shape[0] % 2:  # timm's batch mixing pairs samples with the flipped batch: needs an even batch
            return x, y
        if x.dim() == 5:  # event frames [B, T, C, H, W]: mix as [B, T*C, H, W] so cutmix cuts H and W
            b, t, c, h, w = x.shape
            xm, ym = self.mixup_fn(x.reshape(b, t * c, h, w), y)
            return xm.reshape(b, t, c, h, w), ym
        return self.mixup_fn(x, y)

    # -- Lightning -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reset(self.net)  # stateful neurons (segments) never carry state from one batch to the next
        return self.predict_logits(self.to_time_major(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x, target = self._mix(x, y)
        reset(self.net)
        loss, logits = self.training_loss(self.to_time_major(x), target)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self._log_accuracy("train", logits, y)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self._log_accuracy(stage, logits, y)
        return logits

    def _log_accuracy(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Top-1 (and top-5) accuracy over the epoch's samples, summed over every process by torchmetrics
        (exact under DDP and with a smaller last batch, unlike a mean of per-batch means)."""
        for name, metric in self.accuracy.items():
            split, key = name.split("_", 1)
            if split == stage:
                metric(logits.detach().float(), y)
                self.log(
                    f"{stage}/{key}",
                    metric,
                    prog_bar=key == "acc" and stage != "train",
                    on_epoch=True,
                    on_step=False,
                )

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self(x).float().softmax(-1)
        return {"pred": probs.argmax(-1), "probs": probs}

    def no_weight_decay(self) -> set[str]:
        """Parameter names (of this module, ``fnmatch`` patterns) kept out of weight decay besides the 1-D
        ones: the network's own ``no_weight_decay()`` (timm's hook), prefixed with ``net.``."""
        hook = getattr(self.net, "no_weight_decay", None)
        return {f"net.{name}" for name in hook()} if callable(hook) else set()

    def configure_optimizers(self):
        from timm.optim import param_groups_weight_decay

        hp = self.hparams
        groups = param_groups_weight_decay(
            self, weight_decay=hp.weight_decay, no_weight_decay_list=sorted(self.no_weight_decay())
        )
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        per_epoch = total / epochs if self.trainer.max_epochs else 0
        warmup = round(hp.warmup_epochs * per_epoch)
        cosine_end = max(total - round(hp.get("cooldown_epochs", 0.0) * per_epoch), 1)
        min_ratio = hp.min_lr / hp.lr if hp.lr > 0 else 0.0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, cosine_end, warmup, min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _accuracy_metrics(num_classes: int) -> dict[str, MulticlassAccuracy]:
    """``<split>_acc`` for train, val and test; ``<split>_acc5`` (top-5) where there are 100 classes or
    more (ImageNet, CIFAR-100). Their states are not saved in checkpoints."""
    ks = {"acc": 1, "acc5": 5} if num_classes >= 100 else {"acc": 1}
    return {
        f"{split}_{key}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
        for split in ("train", "val", "test")
        for key, k in ks.items()
    }


def _network_kwargs(arch_kwargs: dict[str, Any] | None, neuron: Any) -> dict[str, Any]:
    """The model builder's keyword arguments: ``arch_kwargs`` with ``neuron`` (one place for the neuron)."""
    from ..errors import ConfigError

    kwargs = dict(arch_kwargs or {})
    if neuron is None:
        return kwargs
    twice = sorted({"neuron", *NEURON_FIELDS} & set(kwargs))
    if twice:
        raise ConfigError(
            f"model.neuron and model.arch_kwargs.{twice[0]} both set the network's neuron: give its settings "
            "in model.neuron only"
        )
    try:
        kwargs["neuron"] = NeuronConfig.coerce(neuron)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.neuron: {err}") from None
    return kwargs


def _check_recipe(**values: float) -> None:
    """One clear error for a recipe value that cannot work (``--model.T -2``), before anything is built."""
    from ..errors import ConfigError

    rules = {
        "T": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
        "num_classes": (lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
        "lr": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "warmup_epochs": (lambda v: v >= 0, ">= 0"),
        "cooldown_epochs": (lambda v: v >= 0, ">= 0"),
    }
    for key, value in values.items():
        ok, allowed = rules[key]
        if not ok(value):
            raise ConfigError(f"model.{key} must be {allowed}, got {value!r}")
