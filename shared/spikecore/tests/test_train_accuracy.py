"""SpikingClassifier's accuracy: the fraction of the epoch's samples classified right, over every process of
a DDP run (torchmetrics sums the counts), against a count made by hand; top-5 where there are >= 100
classes."""

import subprocess
import sys
import textwrap

import pytest
import torch

# Runs as its own script: Lightning's DDP launcher starts the second process by re-running it.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from spikecore.train.classifier import SpikingClassifier

    K = int(sys.argv[2])

    class Identity(SpikingClassifier):  # the inputs are the logits
        def build_network(self, arch, **kwargs):
            return nn.Flatten()

    def data(rank: int):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(10, K, 1, 1, generator=g)
        y = torch.randint(0, K, (10,), generator=g)
        one_hot = torch.nn.functional.one_hot
        x[:4, :, 0, 0] = one_hot(y[:4], K) * 10.0  # these 4 are right
        x[4:7, :, 0, 0] = one_hot(y[4:7], K) * 5.0 + one_hot((y[4:7] + 1) % K, K) * 10.0  # right second
        # Uneven shards (7 and 3 samples), batches of 2: a mean of per-batch or per-process means is not
        # the fraction of samples right.
        part = slice(0, 7) if rank == 0 else slice(7, 10)
        return x, y, x[part], y[part]

    if __name__ == "__main__":
        devices = int(sys.argv[1])
        model = Identity(arch="none", num_classes=K, warmup_epochs=0)
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             use_distributed_sampler=False, enable_model_summary=False)
        rank = trainer.global_rank if devices > 1 else 0
        if devices > 1:
            _, _, xs, ys = data(rank)
        else:
            _, _, xs, ys = data(0)
            xs2, ys2 = data(1)[2:]
            xs, ys = torch.cat([xs, xs2]), torch.cat([ys, ys2])
        out = trainer.validate(model, DataLoader(TensorDataset(xs, ys), batch_size=2), verbose=False)[0]
        if trainer.global_rank == 0:
            x, y, _, _ = data(0)
            top5 = (x.flatten(1).topk(min(5, K), -1).indices == y[:, None]).any(-1).float().mean().item()
            print(json.dumps({"logged": out, "top1": (x.flatten(1).argmax(-1) == y).float().mean().item(),
                              "top5": top5}))
    """
)


def _validate(tmp_path, devices: int, num_classes: int) -> dict:
    import json

    script = tmp_path / "validate.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(devices), str(num_classes)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("devices", [1, 2])
def test_accuracy_is_the_fraction_of_samples_right_over_every_process(tmp_path, devices):
    result = _validate(tmp_path, devices, num_classes=7)
    assert result["logged"]["val/acc"] == pytest.approx(result["top1"], abs=1e-6)
    assert "val/acc5" not in result["logged"]  # top-5 only with 100 classes or more


def test_top5_with_many_classes(tmp_path):
    result = _validate(tmp_path, 1, num_classes=100)
    assert result["logged"]["val/acc"] == pytest.approx(result["top1"], abs=1e-6)
    assert result["logged"]["val/acc5"] == pytest.approx(result["top5"], abs=1e-6)
    assert result["top5"] > result["top1"]  # the two metrics differ here, so each is really checked


def test_metric_states_are_not_in_checkpoints():
    from torch import nn

    from spikecore.train.classifier import SpikingClassifier

    class Tiny(SpikingClassifier):
        def build_network(self, arch, **kwargs):
            return nn.Linear(3, kwargs["num_classes"])

    keys = Tiny(arch="none", num_classes=100).state_dict().keys()
    assert sorted(keys) == ["net.bias", "net.weight"]
    assert torch.is_tensor(Tiny(arch="none", num_classes=100).accuracy["val_acc5"].tp)
