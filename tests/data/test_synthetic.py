import hashlib
from pathlib import Path

import numpy as np
import pytest

from reidcli.data.naming import parse_market_name
from reidcli.data.synthetic import SyntheticConfig, generate_synthetic, make_identity
from reidcli.errors import ConfigError

CFG = SyntheticConfig(num_train_ids=6, num_test_ids=6, num_distractors=4, num_junk=3, images_per_camera=2, seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_synthetic(tmp_path / "a", CFG)
    generate_synthetic(tmp_path / "b", CFG)
    generate_synthetic(tmp_path / "c", SyntheticConfig(**{**CFG.__dict__, "seed": 4}))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a != c


def test_market_layout_and_names_parse_back(tmp_path):
    counts = generate_synthetic(tmp_path, CFG)
    train = sorted((tmp_path / "bounding_box_train").iterdir())
    query = sorted((tmp_path / "query").iterdir())
    gallery = sorted((tmp_path / "bounding_box_test").iterdir())
    assert counts == {"bounding_box_train": len(train), "query": len(query), "bounding_box_test": len(gallery)}
    train_ids = {parse_market_name(p.name)[0] for p in train}
    assert train_ids == set(range(1, 7))
    gal = [parse_market_name(p.name) for p in gallery]
    assert sum(pid == 0 for pid, _ in gal) == 4 and sum(pid == -1 for pid, _ in gal) == 3
    test_ids = {pid for pid, _ in gal if pid > 0}
    assert test_ids == set(range(7, 13))
    for p in query:  # every query has a gallery image of its id in another camera
        pid, cam = parse_market_name(p.name)
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gal)
    for p in train[:3] + query[:3]:
        from PIL import Image

        assert Image.open(p).size == (64, 128)


def test_mirrored_pairs_swap_top_and_bottom():
    a, b = make_identity(0, 10), make_identity(0, 11)
    np.testing.assert_array_equal(a.top, b.bottom)
    np.testing.assert_array_equal(a.bottom, b.top)
    assert not np.array_equal(a.top, a.bottom)


def test_bad_knobs():
    with pytest.raises(ConfigError, match="cameras"):
        SyntheticConfig(num_cameras=12).validate()
    with pytest.raises(ConfigError, match="difficulty"):
        SyntheticConfig(difficulty=2.0).validate()
    with pytest.raises(ConfigError, match="cannot be negative"):
        SyntheticConfig(num_junk=-5).validate()
