import numpy as np
import pytest
import torch
from _brain_reference import dense_similarity

from sae_brainmap.alignment import top_matches


def _data(seed=0, n=40, u=70, v=50):
    gen = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(n, u, generator=gen))  # SAE codes are non-negative and often zero
    b = torch.randn(n, v, generator=gen)
    b[:, :10] += 2 * a[:, 20:30]  # some voxels follow a latent closely
    a[:, 5] = 0.0  # a dead latent: never a winner
    b[:, 45] = 3.0  # a constant voxel: value 0, index -1
    return a, b


@pytest.mark.parametrize("centered", [True, False])
def test_top_matches_against_dense_numpy(centered):
    a, b = _data()
    vals, idx = top_matches(a, b, k=3, centered=centered, chunk=16)
    s = dense_similarity(a.numpy(), b.numpy(), centered)
    s[5] = -np.inf
    order = np.argsort(-s, axis=0, kind="stable")[:3].T  # [V, 3]
    for v in range(b.shape[1]):
        if v == 45 and centered:
            assert idx[v].tolist() == [-1, -1, -1] and vals[v].tolist() == [0.0, 0.0, 0.0]
            continue
        assert idx[v].tolist() == order[v].tolist()
        np.testing.assert_allclose(vals[v].numpy(), s[order[v], v], atol=1e-5)
    assert 5 not in idx
    assert (idx[:10, 0] == torch.arange(20, 30)).all()


def test_top_matches_ties_go_to_the_smaller_latent():
    a, b = _data(1)
    a[:, 40] = a[:, 12]  # an exact duplicate of latent 12
    b[:, 3] = a[:, 12] * 2 + 1  # voxel 3 follows it perfectly
    vals, idx = top_matches(a, b, k=2)
    assert idx[3].tolist() == [12, 40]
    np.testing.assert_allclose(vals[3].numpy(), [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "msg"),
    [
        (torch.zeros(10, 4), torch.zeros(9, 4), "same images"),
        (torch.zeros(10), torch.zeros(10, 4), "2-D"),
        (torch.zeros(2, 4), torch.zeros(2, 4), "at least 3"),
    ],
)
def test_top_matches_says_what_is_wrong(a, b, msg):
    with pytest.raises(ValueError, match=msg):
        top_matches(a, b)


def test_top_matches_rejects_k_beyond_the_latents():
    with pytest.raises(ValueError, match="k must be between"):
        top_matches(torch.randn(10, 4), torch.randn(10, 3), k=5)
