"""``fit`` under DDP on two CPU processes: the epoch metrics are those of one process seeing all the data
(torchmetrics sums the states), and a store is extracted once, by one process, the same as a one-process
extraction; each process then trains on its own share of the store's batches."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs as its own script: Lightning's DDP launcher starts the second process by re-running it.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import pytorch_lightning as pl
    import torch
    import sae_brainmap.data
    from sae_brainmap import BrainMapSAE
    from sae_brainmap.data import StoreDataModule
    from sae_brainmap.metrics import batch_metrics
    from sae_brainmap.module import SAEModule
    from sae_brainmap.sae import SAE, SAEConfig

    TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 32}

    def shards():
        # Uneven shards: 2 batches of 24 tokens on rank 0, 2 of 6 on rank 1 (the same number of steps, as
        # DDP needs); a mean of per-batch or per-process means is not the mean over tokens.
        x = torch.randn(60, 16, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
        return [[x[0:24], x[24:48]], [x[48:54], x[54:60]]]

    def trainer(devices, **kw):
        return pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, **kw)

    class Seen(pl.Callback):  # the store batches this process trained on
        def __init__(self):
            self.batches = []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append(batch["layer_00"][0].tolist())

    if __name__ == "__main__":
        devices, out = int(sys.argv[1]), Path(sys.argv[2])
        # (a) Epoch metrics. lr 0 and no data-dependent init: every batch meets the same weights in both
        # runs, so the numbers compare exactly.
        sae = SAE(SAEConfig(kind="topk", d_in=16, n_latents=64, k=2), init_seed=0)
        sae.normalize_decoder()
        model = SAEModule({"sae": sae}, lr=0.0, weight_decay=0.0, stop_patience=None, log_every_n_steps=1)
        model.initialized.fill_(True)
        t = trainer(devices, max_epochs=1, use_distributed_sampler=False)
        rank = t.global_rank
        parts = shards()
        mine = [b for p in parts for b in p] if devices == 1 else parts[rank]
        t.fit(model, torch.utils.data.DataLoader([{"sae": b} for b in mine], batch_size=None))
        result = {"rank": rank, "world_size": t.world_size,
                  "logged": {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("epoch/")}}
        if rank == 0:  # by hand, over all the tokens
            sae = model.saes["sae"].eval()
            sums, n, fired, per_batch = {}, 0, torch.zeros(64, dtype=torch.bool), []
            with torch.no_grad():
                for b in [b for p in parts for b in p]:
                    x_hat, z = sae(b)
                    m = batch_metrics(b, x_hat, z)
                    per_batch.append(m)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * len(b)
                    n += len(b)
                    fired |= (z != 0).any(0)
            result["expected"] = {k: v / n for k, v in sums.items()}
            result["expected"]["dead_fraction"] = 1 - fired.float().mean().item()
            result["batch_mean"] = {k: sum(m[k] for m in per_batch) / len(per_batch) for k in sums}
            with torch.no_grad():
                fired0 = (torch.cat([sae(b)[1] for b in parts[0]]) != 0).any(0)
            result["dead_rank0_only"] = 1 - fired0.float().mean().item()

        # (b) A store extracted by fit (StoreDataModule), then trained on.
        calls = []
        extract = sae_brainmap.data.extract_activations
        def counted(*args, **kw):
            calls.append(rank)
            return extract(*args, **kw)
        sae_brainmap.data.extract_activations = counted
        pl.seed_everything(0)  # the same random backbone in every process and run
        model = BrainMapSAE(backbone_kwargs=TINY, layers=[0, 2], kind="topk", n_latents=32, k=4, lr=1e-3,
                            stop_patience=None, print_metrics=False, export_dir=str(out / "saes"))
        dm = StoreDataModule(store=str(out / "store"), n_images=10, batch_size=2, images_per_shard=3,
                             extract_batch_size=2)
        seen = Seen()
        t = trainer(devices, max_epochs=1, callbacks=[seen])
        t.fit(model, datamodule=dm)
        result |= {"extract_calls": calls, "store_batches": seen.batches,
                   "store_epoch": sorted(k for k in t.callback_metrics if k.startswith("epoch/"))}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    """
)


def _fit(tmp_path: Path, devices: int) -> tuple[Path, list[dict]]:
    out = tmp_path / f"devices{devices}"
    out.mkdir()
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(devices), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def test_fit_under_ddp_logs_the_one_process_metrics_and_writes_one_store(tmp_path):
    one_dir, (one,) = _fit(tmp_path, 1)
    two_dir, (r0, r1) = _fit(tmp_path, 2)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)

    # (a) The epoch metrics: the same numbers on both processes, equal to one process's over all the
    # tokens (token-weighted means; latents dead when they fired on no token of either process).
    names = ["l0", "fve", "nmse", "mse", "loss", "dead_fraction"]
    assert sorted(one["logged"]) == sorted(f"epoch/sae/{k}" for k in names)
    for k in names:
        key = f"epoch/sae/{k}"
        assert r0["logged"][key] == pytest.approx(one["logged"][key], rel=1e-6, abs=1e-9), k
        assert r1["logged"][key] == r0["logged"][key], k
    for k in ("l0", "fve", "nmse", "mse", "dead_fraction"):
        assert one["logged"][f"epoch/sae/{k}"] == pytest.approx(one["expected"][k], rel=1e-5, abs=1e-7), k
    # ... which a mean of per-batch (or per-process) means, or rank 0's own dead latents, would not give.
    assert one["batch_mean"]["fve"] != pytest.approx(one["expected"]["fve"], rel=1e-3)
    assert one["batch_mean"]["nmse"] != pytest.approx(one["expected"]["nmse"], rel=1e-3)
    assert r0["dead_rank0_only"] > one["expected"]["dead_fraction"]

    # (b) The store: extracted once (by rank 0, while rank 1 waited), every image exactly once, and the
    # same bytes as a one-process extraction.
    assert one["extract_calls"] == [0] and r0["extract_calls"] == [0] and r1["extract_calls"] == []
    manifests = [json.loads((d / "store" / "manifest.json").read_text()) for d in (one_dir, two_dir)]
    assert manifests[0] == manifests[1]
    shards = manifests[1]["shards"]
    images = [i for s in shards for i in range(s["first_image"], s["first_image"] + s["n_images"])]
    assert images == list(range(10)) and manifests[1]["n_images"] == 10
    assert sum(s["n_tokens"] for s in shards) == 10 * manifests[1]["tokens_per_image"]
    for s in shards:
        assert (two_dir / "store" / s["file"]).read_bytes() == (one_dir / "store" / s["file"]).read_bytes()
    assert sorted(p.name for p in (two_dir / "store").iterdir()) == sorted(
        p.name for p in (one_dir / "store").iterdir()
    )
    # Each process trained on its own share of the store's batches (the same order in both runs: every
    # other batch, the odd one out left so that both take as many steps).
    batches = one["store_batches"]
    assert len(batches) == 5  # 10 images x 4 tokens, 8 tokens a batch
    assert r0["store_batches"] == batches[0:4:2] and r1["store_batches"] == batches[1:4:2]
    assert r0["store_epoch"] == one["store_epoch"] and "epoch/layer_02/fve" in one["store_epoch"]
    assert sorted(p.name for p in (two_dir / "saes").glob("*.safetensors")) == [
        "layer_00.safetensors",
        "layer_02.safetensors",
    ]


def test_metric_states_are_not_in_checkpoints():
    import pytorch_lightning as pl
    import torch

    from sae_brainmap.metrics import EpochMeasures
    from sae_brainmap.module import SAEModule
    from sae_brainmap.sae import SAE, SAEConfig

    model = SAEModule({"sae": SAE(SAEConfig(kind="topk", d_in=8, n_latents=16, k=2))}, stop_patience=None)
    keys = sorted(model.state_dict())
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = [{"sae": torch.randn(16, 8)} for _ in range(2)]
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert isinstance(model._measures["sae"], EpochMeasures)
    assert sorted(model.state_dict()) == keys  # the same keys as before: old checkpoints still load
    assert all(k.startswith("saes.sae.") or k == "initialized" for k in keys)  # no metric state
    assert set(model.epoch_metrics["sae"]) == {"l0", "fve", "nmse", "mse", "loss", "dead_fraction"}
