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

from .metrics import EpochMeasures, batch_metrics
from .sae import SAE, SAEConfig, default_lr


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


# AdamW's weight decay when none is given: PyTorch's default, which the authors' code keeps.
DEFAULT_WEIGHT_DECAY = 0.01


def objective(sae: SAE, out: dict[str, Tensor]) -> Tensor:
    """What the stopping rule watches, from ``sae.loss``'s parts: the reconstruction error (nMSE) for
    TopK kinds (their L0 is fixed; AuxK only helps training), the whole loss for relu_l1 and jumprelu
    (their penalty trades sparsity against reconstruction)."""
    return out["nmse"] if sae.config.kind in ("topk", "batchtopk") else out["loss"]


@torch.no_grad()
def heldout_measures(sae: SAE, x: Tensor, chunk: int = 1024) -> dict[str, float]:
    """``objective`` (as in training, but with the inference-mode SAE) and FVE of ``sae`` on ``x``
    ``[n, d]``, in chunks of ``chunk`` rows."""
    c = sae.config
    x = x.float()
    err = nmse = penalty = 0.0
    for lo in range(0, len(x), chunk):
        xb = x[lo : lo + chunk]
        x_hat, z = sae(xb)
        e = (xb - x_hat).pow(2).sum(-1)
        norm2 = xb.pow(2).sum(-1).clamp_min(1e-12)
        err += float(e.sum())
        nmse += float((e / norm2).sum())
        if c.kind == "relu_l1":
            penalty += c.l1_coeff * float((z.abs().sum(-1) / norm2.sqrt()).sum())
        elif c.kind == "jumprelu":
            penalty += c.l0_coeff * float((z != 0).sum())
    var = float((x - x.mean(0)).pow(2).sum())
    return {"objective": (nmse + penalty) / len(x), "fve": 1 - err / max(var, 1e-12)}


class StopWhenConverged(pl.Callback):
    """Stops training when every SAE has stopped improving (the trainer's max_steps / max_epochs stay
    the cap).

    Every ``every`` steps each SAE's objective (nMSE for TopK kinds, the whole loss for relu_l1 and
    jumprelu: see :func:`objective`) is measured on ``heldout`` tokens (``{sae name: [n, d]}``) when
    given, else averaged over the training batches of the last ``every`` steps, each taken before the
    update on it (so on unseen tokens in a first epoch). An SAE has converged when its objective has not
    gone below ``(1 - rel_tol)`` times its best for ``patience`` measurements in a row; training stops
    when all have. ``history`` holds every measurement; ``stopped_at`` the step it stopped at (None:
    it did not).
    """

    def __init__(
        self,
        every: int = 50,
        patience: int = 3,
        rel_tol: float = 0.01,
        heldout: dict[str, Tensor] | None = None,
    ) -> None:
        if every < 1 or patience < 1 or not rel_tol >= 0:
            raise ValueError(f"every ({every}) and patience ({patience}) must be >= 1, rel_tol >= 0")
        self.every, self.patience, self.rel_tol, self.heldout = every, patience, rel_tol, heldout
        self.best: dict[str, float] = {}
        self.since: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.stopped_at: int | None = None

    def state_dict(self) -> dict[str, Any]:  # a resumed run keeps its bests
        return {"best": self.best, "since": self.since, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.since = dict(state_dict["best"]), dict(state_dict["since"])
        self.stopped_at = state_dict.get("stopped_at")

    def _measure(self, module: "SAEModule") -> dict[str, dict[str, float]]:
        if self.heldout is None:
            return {name: {"objective": value} for name, value in module.pop_window().items()}
        out = {}
        for name, sae in module.saes.items():
            was_training = sae.training
            sae.normalize_decoder()  # as after this step's update (a no-op when already done)
            sae.eval()
            out[name] = heldout_measures(sae, self.heldout[name].to(module.device))
            sae.train(was_training)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        measured = self._measure(pl_module)
        if not measured:
            return
        reduce = trainer.strategy.reduce  # every rank decides on the same (averaged) numbers
        for m in measured.values():
            value = torch.tensor(m["objective"], device=pl_module.device)
            m["objective"] = float(reduce(value, reduce_op="mean"))
        for name, m in measured.items():
            best = self.best.get(name)
            if best is None or m["objective"] < best * (1 - self.rel_tol):
                self.best[name], self.since[name] = m["objective"], 0
            else:
                self.since[name] = self.since.get(name, 0) + 1
        self.history.append({"step": step, **{n: dict(m) for n, m in measured.items()}})
        waiting = min(self.since.values())
        pl_module.log("stop/no_gain", float(waiting), prog_bar=True, batch_size=1)
        if self.heldout is not None:
            fve = sum(m["fve"] for m in measured.values()) / len(measured)
            pl_module.log("heldout/fve", fve, prog_bar=True, batch_size=1)
        if waiting >= self.patience:
            self.stopped_at = step
            trainer.should_stop = True


class SAEModule(pl.LightningModule):
    """Trains ``saes`` (a dict of :class:`SAE`) with AdamW; logs L0, FVE, nMSE and dead fraction per SAE.

    ``lr`` None: each SAE gets :func:`sae_brainmap.sae.default_lr` for its kind and width. Unless
    ``stop_patience`` is None, training stops once converged (:class:`StopWhenConverged` with
    ``stop_every``, ``stop_patience``, ``stop_rel_tol``, on the training batches; ``train_sae`` measures
    on held-out tokens instead)."""

    def __init__(
        self,
        saes: dict[str, SAE] | None = None,
        lr: float | None = None,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        betas: tuple[float, float] = (0.9, 0.999),
        log_every_n_steps: int = 10,
        stop_every: int = 50,
        stop_patience: int | None = 3,
        stop_rel_tol: float = 0.01,
    ) -> None:
        super().__init__()
        self.saes = torch.nn.ModuleDict(saes or {})
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.log_every = log_every_n_steps
        self.stop_every, self.stop_patience, self.stop_rel_tol = stop_every, stop_patience, stop_rel_tol
        self.heldout: dict[str, Tensor] | None = None  # train_sae's held-out tokens for the stopping rule
        self._window: dict[str, list[float]] = {}  # per SAE: [sum of objectives, steps] since last read
        # Data-dependent init (b_pre = data mean, input scale) happens on the first batch, once.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Epoch measures per SAE (torchmetrics: exact under DDP; made in on_train_start, kept out of the
        # module's children so that they never reach a checkpoint or the model summary).
        self._measures: dict[str, EpochMeasures] = {}
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
        self._measures = {}
        for name, sae in self.saes.items():
            measures = EpochMeasures(sae.config.n_latents)
            if self.device.type == "mps":  # no float64 there
                measures.set_dtype(torch.float32)
            self._measures[name] = measures.to(self.device)

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
            win = self._window.setdefault(name, [0.0, 0])
            win[0] += float(objective(sae, out).detach())
            win[1] += 1
            if name in self._measures:
                self._measures[name].update(metrics, out["z"])
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

    def pop_window(self) -> dict[str, float]:
        """Mean training objective of each SAE since the last call (for :class:`StopWhenConverged`)."""
        out = {name: total / n for name, (total, n) in self._window.items() if n}
        self._window = {}
        return out

    def configure_callbacks(self):
        if self.stop_patience is None:
            return []
        return [StopWhenConverged(self.stop_every, self.stop_patience, self.stop_rel_tol, self.heldout)]

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
        # Token-weighted means over every batch of every process, and the latents that fired on no token
        # of the epoch: compute() sums the states across processes, so every rank logs the same numbers.
        self.epoch_metrics = {}
        for name, measures in self._measures.items():
            if measures.update_count == 0:  # no batch this epoch
                continue
            means = measures.compute()
            measures.reset()
            self.epoch_metrics[name] = means
            self.log_dict({f"epoch/{name}/{k}": v for k, v in means.items()})

    # ---------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        toks = self.tokens(batch)
        for name, sae in self.saes.items():
            x_hat, z = sae(toks[name])
            metrics = batch_metrics(toks[name], x_hat, z)
            self.log_dict({f"val/{name}/{k}": v for k, v in metrics.items()}, batch_size=len(z))

    def configure_optimizers(self):
        # One parameter group per SAE (never the frozen backbone), each at its own default lr unless set.
        groups = [
            {
                "params": [p for p in sae.parameters() if p.requires_grad],
                "lr": self.lr if self.lr is not None else default_lr(sae.config.kind, sae.config.n_latents),
            }
            for sae in self.saes.values()
        ]
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay, betas=self.betas)


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
HELDOUT_MAX_ROWS = 4096  # train_sae's held-out slice: ``heldout`` of the rows, at most this many
HELDOUT_MIN_ROWS = 64  # fewer: the stopping rule watches the training batches instead


def train_sae(
    acts: Tensor,
    kind: str = "relu_l1",
    n_latents: int | None = None,
    *,
    expansion: int = 16,
    batch_size: int = 512,
    epochs: int | None = None,
    max_steps: int = 10_000,
    heldout: float = 0.05,
    stop_every: int = 50,
    stop_patience: int | None = 3,
    stop_rel_tol: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    callbacks: list[pl.Callback] | None = None,
    **hparams: Any,
) -> SAE:
    """Train one SAE on ``acts [n, d]`` with the same LightningModule the CLI uses; returns it in eval mode.

    Batches of ``batch_size`` rows (512: on CPU, smaller batches reached a planted dictionary sooner in
    wall time than 1,024 or 4,096, see benchmarks/sae_recovery.py; raise it on a GPU). How long: until
    converged. A ``heldout`` fraction of the rows (at most 4,096; drawn at random with
    ``seed``) is set aside, and every ``stop_every`` steps the SAE's objective on it (nMSE for TopK kinds,
    the whole loss for relu_l1 / jumprelu) is measured; training stops when it has not improved by
    ``stop_rel_tol`` (relative) on its best for ``stop_patience`` measurements in a row, or after
    ``max_steps`` steps (the cap), or after ``epochs`` passes over the data if given (None or -1: no epoch
    cap). ``stop_patience=None`` switches the rule off (and ``heldout`` is then not set aside).
    ``sae.train_log`` says what happened: ``steps``, ``stopped`` (``"converged"`` or ``"cap"``) and the
    ``history`` of held-out measurements (objective and FVE per measurement). ``callbacks``: more
    Lightning callbacks for the trainer.

    ``n_latents`` defaults to ``expansion * d`` (the paper's x16). ``hparams`` are :class:`SAEConfig`
    fields (``k``, ``l1_coeff``, ``tied``, ``unit_norm_decoder``, ``init``, ``layer``, ...) or optimiser
    settings (``lr``: default :func:`sae_brainmap.sae.default_lr`, Gao et al.'s scaling with
    ``n_latents``; ``weight_decay``: 0.01, PyTorch's AdamW default, as in the authors' code; ``betas``).
    """
    if acts.dim() != 2:
        raise ValueError(f"acts must be [n, d], got shape {tuple(acts.shape)}")
    if len(acts) == 0:
        raise SAETrainingError("acts hold no rows: nothing to train on")
    bad = nonfinite_summary(acts, "acts")
    if bad:
        raise SAETrainingError(f"{bad}; an SAE trained on them would have NaN weights")
    opt = {k: hparams.pop(k) for k in _TRAINER_KEYS if k in hparams}
    pl.seed_everything(seed, verbose=False)
    n_held = min(HELDOUT_MAX_ROWS, int(len(acts) * heldout)) if stop_patience is not None else 0
    held = None
    if n_held >= HELDOUT_MIN_ROWS and len(acts) - n_held >= n_held:
        perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))
        held, acts = acts[perm[:n_held]], acts[perm[n_held:]]
    batch_size = min(batch_size, len(acts))
    d = acts.shape[1]
    config = SAEConfig(kind=kind, d_in=d, n_latents=n_latents or expansion * d, **hparams)
    module = SAEModule(
        {"sae": SAE(config, init_seed=seed)},
        log_every_n_steps=10**9,
        stop_every=stop_every,
        stop_patience=stop_patience,
        stop_rel_tol=stop_rel_tol,
        **opt,
    )
    module.heldout = {"sae": held} if held is not None else None
    loader = torch.utils.data.DataLoader(_ShuffledBatches(acts, batch_size, seed), batch_size=None)
    trainer = pl.Trainer(
        max_epochs=-1 if epochs is None else epochs,
        max_steps=max_steps,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    try:
        trainer.fit(module, loader)
    except SAETrainingError as err:
        layer = hparams.get("layer")
        raise SAETrainingError(f"layer {layer}: {err}" if layer is not None else str(err)) from None
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, StopWhenConverged)), None)
    sae = module.saes["sae"].eval()
    sae.train_log = {
        "steps": trainer.global_step,
        "stopped": "converged" if stop is not None and stop.stopped_at is not None else "cap",
        "history": [] if stop is None else [{"step": h["step"], **h["sae"]} for h in stop.history],
    }
    return sae
