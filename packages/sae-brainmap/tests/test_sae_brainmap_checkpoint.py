"""SAE checkpoints: everything needed to use an SAE comes back; every bad file gives one clear error."""

import json
import os

import pytest
import torch

from sae_brainmap import KINDS, SAECheckpointError, load_sae, make_sae, save_sae


def _trained_like(kind: str):
    sae = make_sae(kind, 12, 40, init_seed=3, k=5, layer=7, backbone="vit_base_patch16_clip_quickgelu_224")
    x = torch.randn(64, 12) * 3 + 1
    sae.init_from_data(x)
    with torch.no_grad():  # move every tensor away from its init so that a partial load would show
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.train().encode(x)  # batchtopk: sets its inference threshold
    return sae.eval(), x


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_the_same_sae(kind, suffix, tmp_path):
    sae, x = _trained_like(kind)
    path = save_sae(sae, tmp_path / f"sae{suffix}")
    back = load_sae(path)
    assert back.config == sae.config
    assert back.config.layer == 7 and back.config.backbone.startswith("vit_base")
    assert float(back.input_scale) == float(sae.input_scale) != 1.0 or kind == "relu_l1"
    x_hat, z = sae(x)
    x_hat2, z2 = back.eval()(x)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    torch.testing.assert_close(x_hat2, x_hat, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    sae, _ = _trained_like("topk")
    good = save_sae(sae, tmp_path / "good.safetensors")

    with pytest.raises(SAECheckpointError, match="does not exist"):
        load_sae(tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SAECheckpointError, match="cannot read"):
        load_sae(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(SAECheckpointError, match="cannot read"):
        load_sae(garbage)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "sae_brainmap.sae/1", "config": "{}", "state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(SAECheckpointError, match="cannot read"):
        load_sae(evil)
    assert not marker.exists()

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(SAECheckpointError, match="not an sae_brainmap SAE checkpoint"):
        load_sae(foreign)

    # Tensors that do not fit the config they travel with (e.g. a file edited or mixed up by hand).
    state = {k: v.contiguous() for k, v in sae.state_dict().items()}
    config = sae.config.to_dict() | {"n_latents": 41}
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(state, str(mismatched), metadata={"format": "sae_brainmap.sae/1", "config": json.dumps(config)})
    with pytest.raises(SAECheckpointError, match="does not match"):
        load_sae(mismatched)

    unknown = tmp_path / "unknown_kind.safetensors"
    config = sae.config.to_dict() | {"kind": "gated"}
    save_file(state, str(unknown), metadata={"format": "sae_brainmap.sae/1", "config": json.dumps(config)})
    with pytest.raises(SAECheckpointError, match="unknown SAE kind"):
        load_sae(unknown)

    missing_key = tmp_path / "missing_key.safetensors"
    state.pop("b_lat")
    save_file(
        state,
        str(missing_key),
        metadata={"format": "sae_brainmap.sae/1", "config": json.dumps(sae.config.to_dict())},
    )
    with pytest.raises(SAECheckpointError, match="missing"):
        load_sae(missing_key)
