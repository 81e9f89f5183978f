"""NaN and infinity: refused as training input, caught when training diverges, never saved or loaded."""

import json

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from spikecore_testing import serve_folder

from sae_brainmap import SAECheckpointError, SAETrainingError, load_sae, make_sae, save_sae, train_sae
from sae_brainmap.module import SAEModule
from spikecore.serialization import CheckpointError


def _acts(n: int = 256, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def test_non_finite_training_input_is_refused_saying_how_many_and_where():
    acts = _acts()
    acts[5, 1] = float("nan")
    acts[5, 3] = float("nan")
    acts[200, 0] = float("inf")
    with pytest.raises(SAETrainingError) as err:
        train_sae(acts, kind="topk", n_latents=16, k=2, max_steps=2, epochs=-1)
    message = str(err.value)
    assert "3 non-finite values (NaN, +inf) in 2 of 256 rows, the first at row 5, column 1" in message
    assert "\n" not in message and isinstance(err.value, ValueError)
    with pytest.raises(SAETrainingError, match="no rows"):
        train_sae(acts[:0], kind="topk", n_latents=16, k=2)


def test_a_training_that_diverges_stops_with_a_clear_error_instead_of_returning_nan_weights():
    # AdamW's first step moves every weight by ~lr: at 1e30 the next forward overflows to NaN
    with pytest.raises(
        SAETrainingError, match=r"layer 4: the SAE diverged at step 1: its loss is nan.*lower"
    ):
        train_sae(
            _acts(), kind="relu_l1", n_latents=16, lr=1e30, batch_size=64, max_steps=5, epochs=-1, layer=4
        )
    sae = train_sae(_acts(), kind="relu_l1", n_latents=16, lr=1e-3, batch_size=64, max_steps=5, epochs=-1)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())  # a sane lr trains as before


class _PoisonAfter(pl.Callback):
    """Sets one decoder weight to NaN after step ``step`` (a stand-in for an update that overflowed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.saes["layer_03"].W_dec[0, 0] = float("nan")


def _fit(max_steps: int, poison_step: int) -> SAEModule:
    module = SAEModule({"layer_03": make_sae("topk", 8, 16, k=2)}, lr=1e-3)
    batches = [{"layer_03": t} for t in _acts(256).split(64)]
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_PoisonAfter(poison_step)])  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module


def test_divergence_is_caught_at_the_next_step_or_at_the_end_of_training():
    with pytest.raises(
        SAETrainingError, match=r"the SAE layer_03 diverged at step 2: its loss is nan \(non-finite W_dec\)"
    ):
        _fit(max_steps=4, poison_step=2)
    with pytest.raises(
        SAETrainingError, match="the SAE layer_03 diverged in the last step: non-finite W_dec"
    ):
        _fit(max_steps=3, poison_step=3)


def test_non_finite_input_tokens_during_training_are_named_as_the_cause():
    module = SAEModule({"layer_00": make_sae("topk", 8, 16, k=2)}, lr=1e-3)
    first, second = _acts(128).split(64)
    second = second.clone()
    second[7, 2] = float("-inf")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    batches = [{"layer_00": first}, {"layer_00": second}]
    with pytest.raises(
        SAETrainingError, match=r"step 1: the input tokens of the SAE layer_00 hold 1 non-finite"
    ):
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))


def test_sae_files_with_nan_weights_are_neither_written_nor_read(tmp_path):
    sae = make_sae("topk", 8, 16, k=2, layer=3)
    good = save_sae(sae, tmp_path / "good.safetensors")
    with torch.no_grad():
        sae.W_enc[1, 2] = float("nan")
    with pytest.raises(SAECheckpointError, match=r"refusing to save .*W_enc hold NaN"):
        save_sae(sae, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob("*.tmp"))

    # files written by something else (or damaged on disk): refused on load, in both formats
    state = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    meta = {"format": "sae_brainmap.sae/1", "config": json.dumps(sae.config.to_dict())}
    nan_st = tmp_path / "nan.safetensors"
    save_file(state, str(nan_st), metadata=meta)
    with pytest.raises(SAECheckpointError, match=r"NaN or infinite values in 'W_enc'") as err:
        load_sae(nan_st)
    assert isinstance(err.value, CheckpointError)  # spikecore's type: one line from every console script
    nan_pt = tmp_path / "nan.pt"
    torch.save({**meta, "state_dict": state}, nan_pt)
    with pytest.raises(SAECheckpointError, match=r"NaN or infinite values in 'W_enc'"):
        load_sae(nan_pt)
    state["b_dec" if "b_dec" in state else "b_pre"].fill_(float("inf"))
    state["W_enc"][1, 2] = 0.0
    inf_st = tmp_path / "inf.safetensors"
    save_file(state, str(inf_st), metadata=meta)
    with pytest.raises(SAECheckpointError, match="NaN or infinite"):
        load_sae(inf_st)
    assert load_sae(good).config.layer == 3  # a sound file still loads

    with serve_folder(tmp_path) as (url, requests):
        with pytest.raises(SAECheckpointError, match="is a URL"):
            load_sae(f"{url}/good.safetensors")
    assert requests == []
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(SAECheckpointError, match="empty"):
        load_sae(empty)
