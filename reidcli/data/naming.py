"""File-name conventions of the public ReID datasets."""

from __future__ import annotations

import re

from reidcli.errors import DataError

__all__ = ["parse_market_name", "parse_msmt_name", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Market-1501 `0002_c1s1_000451_03.jpg`, DukeMTMC-reID `0001_c2_f0046182.jpg`, CUHK03-NP `0001_c1_1.png`.
_MARKET = re.compile(r"^(-1|\d+)_c(\d+)")
# MSMT17 `0000_000_01_0303morning_0015_0.jpg`: pid, index, camera (1-based), …
_MSMT = re.compile(r"^(\d+)_(\d+)_(\d+)_")


def parse_market_name(name: str) -> tuple[int, int]:
    """``'0002_c1s1_000451_03.jpg'`` → ``(2, 0)``: pid and 0-based camera; pid −1 is junk, 0 a distractor."""
    m = _MARKET.match(name)
    if m is None or int(m.group(2)) < 1:
        raise DataError(
            f"file name {name!r} does not follow the Market-1501 naming PID_cCAM… (e.g. 0002_c1s1_000451_03.jpg); "
            "rename or remove it"
        )
    return int(m.group(1)), int(m.group(2)) - 1


def parse_msmt_name(name: str) -> int:
    """``'0000_000_01_0303morning_0015_0.jpg'`` → 0-based camera 0."""
    m = _MSMT.match(name)
    if m is None or int(m.group(3)) < 1:
        raise DataError(
            f"file name {name!r} does not follow the MSMT17 naming PID_IDX_CAM_… "
            "(e.g. 0000_000_01_0303morning_0015_0.jpg); rename or remove it"
        )
    return int(m.group(3)) - 1
