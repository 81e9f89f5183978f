"""BrainMapSAE: one SAE per selected ViT layer, all trained from one backbone pass (the authors' setup).

Batches are images (online mode, the default: nothing is stored) or ``{"layer_XX": tokens}`` from an
activation store. At the end of ``fit`` each SAE is exported to ``<log dir>/saes/layer_XX.safetensors``
and the per-layer metrics of the last epoch are printed.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .backbone import DEFAULT_BACKBONE, ViTBackbone
from .checkpoint import save_sae
from .module import DEFAULT_WEIGHT_DECAY, SAEModule
from .sae import SAE, SAEConfig
from .store import layer_key


class BrainMapSAE(SAEModule):
    """SAEs on the residual stream of ``backbone``'s ``layers`` (0-based; None: all), ``tokens`` =
    ``patch`` (the authors'), ``cls`` or ``all``. ``n_latents`` defaults to ``expansion * d`` (x16:
    12,288 for ViT-B); ``sae_options`` are further :class:`SAEConfig` fields (``l1_coeff``, ``tied``,
    ``unit_norm_decoder``, ``aux_k``, ``init``, ...). ``lr`` None: each SAE's
    :func:`sae_brainmap.sae.default_lr`; training stops once every SAE has converged on its training
    batches (``stop_*``, see :class:`sae_brainmap.module.StopWhenConverged`; ``stop_patience: null`` runs
    the trainer's max_epochs / max_steps in full)."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        backbone_checkpoint: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        layers: list[int] | None = None,
        tokens: str = "patch",
        kind: str = "relu_l1",
        n_latents: int | None = None,
        expansion: int = 16,
        k: int | None = None,
        sae_options: dict[str, Any] | None = None,
        lr: float | None = None,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        log_every_n_steps: int = 10,
        stop_every: int = 50,
        stop_patience: int | None = 3,
        stop_rel_tol: float = 0.01,
        init_seed: int = 0,
        export_dir: str | None = None,
        print_metrics: bool = True,
    ) -> None:
        bb = ViTBackbone(backbone, backbone_checkpoint, backbone_kwargs)
        layers = list(range(bb.depth)) if layers is None else sorted(int(i) for i in layers)
        bb.select_tokens(torch.zeros(1, 2, 1), tokens)  # validates the token set early
        d = bb.embed_dim
        saes = {}
        for i in layers:
            config = SAEConfig(
                kind=kind,
                d_in=d,
                n_latents=n_latents or expansion * d,
                k=k,
                layer=i,
                backbone=backbone,
                tokens=tokens,
                **(sae_options or {}),
            )
            saes[layer_key(i)] = SAE(config, init_seed=init_seed + i)
        super().__init__(
            saes,
            lr=lr,
            weight_decay=weight_decay,
            log_every_n_steps=log_every_n_steps,
            stop_every=stop_every,
            stop_patience=stop_patience,
            stop_rel_tol=stop_rel_tol,
        )
        self.save_hyperparameters()
        self.backbone = bb
        self.layers, self.token_set = layers, tokens
        self.export_dir, self.print_metrics = export_dir, print_metrics
        # The frozen backbone is rebuilt from the config: checkpoints hold the SAEs only.
        self.strict_loading = False

    def tokens(self, batch: Any) -> dict[str, Tensor]:
        if isinstance(batch, dict):  # from an activation store
            return super().tokens(batch)
        images = batch[0] if isinstance(batch, list | tuple) else batch
        streams = self.backbone(images, self.layers)
        return {
            layer_key(i): self.backbone.select_tokens(streams[i], self.token_set).reshape(
                -1, streams[i].shape[-1]
            )
            for i in self.layers
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from spikecore.train.checkpoint import CheckpointError

        expected = {k: v.shape for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        have = {k: v.shape for k, v in checkpoint.get("state_dict", {}).items()}
        wrong = [
            f"{k} {tuple(have[k])} != {tuple(s)}" for k, s in expected.items() if k in have and have[k] != s
        ]
        if expected.keys() != have.keys() or wrong:
            raise CheckpointError(
                f"checkpoint does not fit these SAEs: missing {sorted(expected.keys() - have.keys())[:5]}, "
                f"unexpected {sorted(have.keys() - expected.keys())[:5]}, shapes {wrong[:3]}. "
                "Use the config it was trained with."
            )

    # ------------------------------------------------------------------------------------------ output
    def on_fit_end(self) -> None:
        # log_dir is broadcast from rank 0 under DDP: every process asks for it, then only rank 0 writes.
        root = self.trainer.log_dir or self.trainer.default_root_dir  # no logger: the trainer's root
        if self.trainer.global_rank != 0:
            return
        out = Path(self.export_dir) if self.export_dir else Path(root) / "saes"
        for name, sae in self.saes.items():
            save_sae(sae, out / f"{name}.safetensors")
        if self.print_metrics and self.epoch_metrics:
            print(format_metrics(self.epoch_metrics))
            print(f"SAEs written to {out}/")


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    cols = ("l0", "fve", "nmse", "dead_fraction", "loss")
    lines = ["layer      " + "".join(f"{c:>15}" for c in cols)]
    for name, m in metrics.items():
        lines.append(f"{name:<11}" + "".join(f"{m.get(c, float('nan')):>15.4g}" for c in cols))
    return "\n".join(lines)
