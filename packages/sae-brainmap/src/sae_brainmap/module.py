"""The SAE trainer as a LightningModule: one SAE per stream of tokens, all updated from one batch.

``SAEModule`` trains SAEs on batches ``{name: tokens [n, d]}`` (what the activation store yields and what
``train_sae`` feeds); :class:`sae_brainmap.BrainMapSAE` subclasses it to make those batches from images
with one backbone pass (online mode).
"""

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from spikecore.errors import UserError

from .metrics import FiringCounter, batch_metrics
from .sae import SAE, SAEConfig


class SAETrainingError(UserError, ValueError):
    """Training that cannot give a usable SAE: non-finite input activations, or a run that diverged to
    NaN / infinity. Training stops at the first non-finite loss (before its update) or, after the last
    step, at non-finite weights; the SAEs are then not returned or exported."""


def nonfinite_summary(x: Tensor, what: str = "activations") -> str | None:
    """None if ``x`` ``[n, d]`` is all finite, else one line: how many entries and rows, and the first."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    rows = bad.reshape(len(x), -1).any(1) if x.dim() > 1 else bad
    first = [int(i) for i in bad.nonzero()[0]]
    where = f"row {first[0]}, column {first[1]}" if len(first) > 1 else f"entry {first[0]}"
    tests = (("NaN", torch.isnan(x)), ("+inf", x == float("inf")), ("-inf", x == float("-inf")))
    kinds = ", ".join(name for name, m in tests if bool(m.any()))
    return (
        f"{what} hold {int(bad.sum())} non-finite values ({kinds}) in {int(rows.sum())} of {len(x)} rows, "
        f"the first at {where}"
    )


def _label(name: str) -> str:
    return "the SAE" if name == "sae" else f"the SAE {name}"


# Learning rates when none is given: the paper's for relu_l1, the TopK papers' order of magnitude else.
DEFAULT_LR = {"relu_l1": 5e-5, "topk": 2e-4, "batchtopk": 2e-4, "jumprelu": 2e-4}


class SAEModule(pl.LightningModule):
    """Trains ``saes`` (a dict of :class:`SAE`) with AdamW; logs L0, FVE, nMSE and dead fraction per SAE."""

    def __init__(
        self,
        saes: dict[str, SAE] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        log_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        self.saes = torch.nn.ModuleDict(saes or {})
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.log_every = log_every_n_steps
        # Data-dependent init (b_pre = data mean, input scale) happens on the first batch, once.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._epoch: dict[str, dict[str, float]] = {}
        self._firing: dict[str, FiringCounter] = {}
        self.epoch_metrics: dict[str, dict[str, float]] = {}  # last completed epoch's per-SAE means

    # ------------------------------------------------------------------------------------------- batches
    def tokens(self, batch: Any) -> dict[str, Tensor]:
        """``{sae name: tokens [n, d]}`` of a batch (subclasses turn images into this)."""
        return {name: batch[name].float() for name in self.saes}

    # ------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        # Lightning keeps submodules' modes: an SAE handed over in eval mode would not track dead latents.
        self.saes.train()

    def on_train_start(self) -> None:
        self._firing = {name: FiringCounter(sae.config.n_latents) for name, sae in self.saes.items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        toks = self.tokens(batch)
        if not bool(self.initialized):
            for name, sae in self.saes.items():
                sae.init_from_data(toks[name])
                if self.trainer.world_size > 1:  # every rank starts from the same (averaged) statistics
                    reduce = self.trainer.strategy.reduce
                    sae.input_scale.copy_(reduce(sae.input_scale.clone(), reduce_op="mean"))
                    sae.b_pre.data.copy_(reduce(sae.b_pre.data.clone(), reduce_op="mean"))
            self.initialized.fill_(True)
        total = 0.0
        log = self.global_step % self.log_every == 0
        for name, sae in self.saes.items():
            x = toks[name]
            out = sae.loss(x)
            if not bool(torch.isfinite(out["loss"].detach())):
                self._diverged(name, x, out["loss"])
            total = total + out["loss"]
            metrics = batch_metrics(x, out["x_hat"], out["z"])
            metrics["loss"] = float(out["loss"].detach())
            if name in self._firing:
                self._firing[name].update(out["z"])
            acc = self._epoch.setdefault(name, {"n": 0.0})
            acc["n"] += 1
            for key, value in metrics.items():
                acc[key] = acc.get(key, 0.0) + value
            if log:
                self.log_dict({f"train/{name}/{k}": v for k, v in metrics.items()}, batch_size=x.shape[0])
                dead = float(sae.dead_mask().float().mean())
                self.log(f"train/{name}/dead_fraction", dead, batch_size=x.shape[0])
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=1)
        return total

    def _diverged(self, name: str, x: Tensor, loss: Tensor) -> None:
        """Stop on a non-finite loss, before its backward and update, saying whether the input or the
        SAE is to blame."""
        bad_input = nonfinite_summary(x, f"the input tokens of {_label(name)}")
        if bad_input:
            raise SAETrainingError(f"step {self.global_step}: {bad_input}; check the activations")
        bad_weights = [k for k, v in self.saes[name].state_dict().items()
                       if v.is_floating_point() and not bool(torch.isfinite(v).all())]  # fmt: skip
        raise SAETrainingError(
            f"{_label(name)} diverged at step {self.global_step}: its loss is {float(loss.detach())}"
            + (f" (non-finite {', '.join(bad_weights)})" if bad_weights else "")
            + "; lower the learning rate (lr) and train again"
        )

    def on_train_end(self) -> None:
        for name, sae in self.saes.items():  # the last update can still overflow
            bad = [k for k, v in sae.state_dict().items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]  # fmt: skip
            if bad:
                raise SAETrainingError(
                    f"{_label(name)} diverged in the last step: non-finite {', '.join(bad)}; lower the "
                    "learning rate (lr) and train again"
                )

    def on_before_optimizer_step(self, optimizer) -> None:
        for sae in self.saes.values():
            sae.project_decoder_grads()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for sae in self.saes.values():
            sae.normalize_decoder()

    def on_train_epoch_end(self) -> None:
        self.epoch_metrics = {}
        for name, acc in self._epoch.items():
            n = acc.pop("n")
            means = {k: v / n for k, v in acc.items()}
            if name in self._firing:  # latents that never fired during the whole epoch
                means["dead_fraction"] = self._firing[name].dead_fraction()
                self._firing[name] = FiringCounter(self.saes[name].config.n_latents)
            self.epoch_metrics[name] = means
            self.log_dict({f"epoch/{name}/{k}": v for k, v in means.items()})
        self._epoch = {}

    # ---------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        toks = self.tokens(batch)
        for name, sae in self.saes.items():
            x_hat, z = sae(toks[name])
            metrics = batch_metrics(toks[name], x_hat, z)
            self.log_dict({f"val/{name}/{k}": v for k, v in metrics.items()}, batch_size=len(z))

    def configure_optimizers(self):
        kinds = {sae.config.kind for sae in self.saes.values()}
        lr = self.lr if self.lr is not None else DEFAULT_LR[sorted(kinds)[0]]
        params = [p for p in self.saes.parameters() if p.requires_grad]  # never the frozen backbone
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay, betas=self.betas)


class _ShuffledBatches(torch.utils.data.IterableDataset):
    """Contiguous batches of a freshly permuted tensor each epoch (no per-row collation)."""

    def __init__(self, acts: Tensor, batch_size: int, seed: int) -> None:
        self.acts, self.batch_size, self.seed, self.epoch = acts, batch_size, seed, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.acts), generator=gen)
        for start in range(0, len(perm) - self.batch_size + 1, self.batch_size):
            yield {"sae": self.acts[perm[start : start + self.batch_size]]}

    def __len__(self) -> int:
        return len(self.acts) // self.batch_size


_TRAINER_KEYS = ("lr", "weight_decay", "betas")


def train_sae(
    acts: Tensor,
    kind: str = "relu_l1",
    n_latents: int | None = None,
    *,
    expansion: int = 16,
    batch_size: int = 4096,
    epochs: int = 1,
    max_steps: int = -1,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    **hparams: Any,
) -> SAE:
    """Train one SAE on ``acts [n, d]`` with the same LightningModule the CLI uses; returns it in eval mode.

    ``n_latents`` defaults to ``expansion * d`` (the paper's x16). ``hparams`` are :class:`SAEConfig`
    fields (``k``, ``l1_coeff``, ``tied``, ``unit_norm_decoder``, ``layer``, ...) or optimiser settings
    (``lr``, ``weight_decay``, ``betas``).
    """
    if acts.dim() != 2:
        raise ValueError(f"acts must be [n, d], got shape {tuple(acts.shape)}")
    if len(acts) == 0:
        raise SAETrainingError("acts hold no rows: nothing to train on")
    bad = nonfinite_summary(acts, "acts")
    if bad:
        raise SAETrainingError(f"{bad}; an SAE trained on them would have NaN weights")
    if len(acts) < batch_size:
        batch_size = len(acts)
    opt = {k: hparams.pop(k) for k in _TRAINER_KEYS if k in hparams}
    pl.seed_everything(seed, verbose=False)
    d = acts.shape[1]
    config = SAEConfig(kind=kind, d_in=d, n_latents=n_latents or expansion * d, **hparams)
    module = SAEModule({"sae": SAE(config, init_seed=seed)}, log_every_n_steps=10**9, **opt)
    loader = torch.utils.data.DataLoader(_ShuffledBatches(acts, batch_size, seed), batch_size=None)
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    try:
        trainer.fit(module, loader)
    except SAETrainingError as err:
        layer = hparams.get("layer")
        raise SAETrainingError(f"layer {layer}: {err}" if layer is not None else str(err)) from None
    return module.saes["sae"].eval()
