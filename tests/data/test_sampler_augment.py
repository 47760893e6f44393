import numpy as np
import pytest
import torch

from reidcli.data.augment import AugmentConfig, augment_batch, normalize_batch
from reidcli.data.sampler import PKSampler
from reidcli.errors import ConfigError


def test_pk_batches():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 6 + [3] * 1 + [4] * 5)  # id 3 has a single image
    sampler = PKSampler(labels, p=3, k=4)
    batches = sampler.epoch(torch.Generator().manual_seed(0))
    assert batches.shape == (len(labels) // 12, 12)
    for b in batches:
        ids = labels[b.numpy()].reshape(3, 4)
        assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 3  # 3 distinct ids × 4 images
        for row, idx in zip(ids, b.view(3, 4).numpy(), strict=True):
            if (labels == row[0]).sum() >= 4:
                assert len(set(idx)) == 4  # distinct images when the id has enough
    again = sampler.epoch(torch.Generator().manual_seed(0))
    assert torch.equal(batches, again)


def test_pk_single_image_identity_is_repeated():
    labels = np.array([0, 1, 1, 1, 1])
    sampler = PKSampler(labels, p=2, k=2)
    for _ in range(5):
        b = sampler.epoch(torch.Generator().manual_seed(_))[0].numpy()
        assert sorted(labels[b].tolist()) == [0, 0, 1, 1]


def test_pk_splits_identities_across_ranks():
    labels = np.repeat(np.arange(8), 4)
    parts = [PKSampler(labels, 4, 4, rank, 2).epoch(torch.Generator().manual_seed(1)) for rank in (0, 1)]
    full = PKSampler(labels, 4, 4).epoch(torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"p": 9, "k": 2}, "has 8"), ({"p": 2, "k": 5}, "--k 5"), ({"p": 3, "k": 2, "world": 2}, "do not split")],
)
def test_pk_bad_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        PKSampler(np.repeat(np.arange(8), 4), **kw)


def test_augment_shapes_ranges_and_determinism():
    images = torch.randint(0, 256, (6, 32, 16, 3), dtype=torch.uint8)
    a = augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(0))
    b = augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 32, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    plain = augment_batch(images, AugmentConfig(flip=0, pad=0, erase=0), torch.Generator())
    torch.testing.assert_close(plain, normalize_batch(images))
    flipped = augment_batch(images, AugmentConfig(flip=1.0, pad=0, erase=0), torch.Generator())
    torch.testing.assert_close(flipped, normalize_batch(images).flip(3))


def test_pad_crop_moves_content_by_whole_pixels():
    images = torch.zeros(64, 20, 20, 3, dtype=torch.uint8)
    images[:, 10, 10] = 255  # one bright pixel
    out = augment_batch(images, AugmentConfig(flip=0, pad=3, erase=0), torch.Generator().manual_seed(0))
    ys, xs = (out[:, 0] == 1).nonzero(as_tuple=True)[1:]
    assert len(ys) <= 64 and ys.min() >= 7 and ys.max() <= 13 and xs.min() >= 7 and xs.max() <= 13
    assert len(set(ys.tolist())) > 1  # offsets vary


def test_random_erasing_fills_a_rectangle_with_zero():
    images = torch.full((32, 40, 20, 3), 255, dtype=torch.uint8)
    out = augment_batch(images, AugmentConfig(flip=0, pad=0, erase=1.0), torch.Generator().manual_seed(0))
    erased = out[:, 0] == 0
    assert erased.any(dim=(1, 2)).all()
    for m in erased:
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a solid rectangle
