"""The ViT backbone: residual streams equal timm's blocks' outputs; OpenAI/open_clip/timm weights load."""

import pytest
import timm
import torch

from sae_brainmap.backbone import DEFAULT_BACKBONE, BackboneWeightsError, ViTBackbone

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32)


def _reference_streams(vit, images):
    """Outputs of every block via forward hooks on timm's own forward_features."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in vit.blocks]
    with torch.no_grad():
        final = vit.forward_features(images)
    for h in hooks:
        h.remove()
    return seen, final


def test_default_is_clip_vitb16_with_quickgelu_and_all_12_layers_in_one_pass():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        bb = ViTBackbone()
    assert bb.name == DEFAULT_BACKBONE and bb.depth == 12 and bb.embed_dim == 768
    assert type(bb.vit.blocks[0].mlp.act).__name__ == "QuickGELU"
    images = torch.randn(2, 3, 224, 224)
    calls = []
    bb.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    streams = bb(images)
    assert len(calls) == 1 and sorted(streams) == list(range(12))  # one pass for all layers
    ref, final = _reference_streams(bb.vit, images)
    for i in range(12):
        assert streams[i].shape == (2, 197, 768)
        torch.testing.assert_close(streams[i], ref[i])
    torch.testing.assert_close(bb.vit.norm(streams[11]), final)
    assert bb.select_tokens(streams[3], "patch").shape == (2, 196, 768)
    torch.testing.assert_close(bb.select_tokens(streams[3], "cls")[:, 0], streams[3][:, 0])


def test_selected_layers_only_and_bad_layers(recwarn):
    bb = ViTBackbone(model_kwargs=TINY)
    streams = bb(torch.randn(1, 3, 32, 32), layers=[0, 2])
    assert sorted(streams) == [0, 2] and streams[0].shape == (1, 5, 32)
    with pytest.raises(ValueError, match="out of range"):
        bb(torch.randn(1, 3, 32, 32), layers=[3])
    with pytest.raises(ValueError, match="tokens must be"):
        bb.select_tokens(streams[0], "mean")


def _to_openai(state: dict, prefix: str = "visual.") -> dict:
    """The inverse of timm's OpenAI CLIP conversion, written out by hand from OpenAI's module names."""
    out = {}
    for k, v in state.items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        else:
            k = (
                k.replace("patch_embed.proj", "conv1")
                .replace("norm_pre", "ln_pre")
                .replace("blocks.", "transformer.resblocks.")
            )
            k = k.replace("norm1", "ln_1").replace("norm2", "ln_2").replace("attn.qkv.", "attn.in_proj_")
            k = (
                k.replace("attn.proj", "attn.out_proj")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            if k.startswith("norm."):
                k = k.replace("norm.", "ln_post.")
        out[prefix + k] = v
    out[prefix + "proj"] = torch.randn(32, 16)  # the image projection: not part of the residual stream
    out["token_embedding.weight"] = torch.randn(10, 16)  # the text tower is ignored
    return out


@pytest.mark.parametrize("fmt", ["openai", "open_clip", "timm_safetensors", "lightning"])
def test_weights_in_each_format_give_the_source_models_streams(fmt, tmp_path):
    source = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=0, **TINY).eval()
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "timm_safetensors" else "w.pt")
    if fmt == "openai":
        torch.save(_to_openai(state), path)
    elif fmt == "open_clip":
        torch.save({f"visual.trunk.{k}": v for k, v in state.items()}, path)
    elif fmt == "lightning":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    bb = ViTBackbone(checkpoint=str(path), model_kwargs=TINY)
    images = torch.randn(2, 3, 32, 32)
    ref, _ = _reference_streams(source, images)
    streams = bb(images)
    for i in range(3):
        torch.testing.assert_close(streams[i], ref[i])


def test_weights_that_do_not_fit_give_a_clear_error(tmp_path):
    other = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=0, **dict(TINY, embed_dim=16))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="does not fit"):
        ViTBackbone(checkpoint=str(path), model_kwargs=TINY)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(BackboneWeightsError, match="cannot read"):
        ViTBackbone(checkpoint=str(bad), model_kwargs=TINY)
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        ViTBackbone(checkpoint=str(tmp_path / "none.pt"), model_kwargs=TINY)
