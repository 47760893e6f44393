import pytest
from hypothesis import given
from hypothesis import strategies as st

from reidcli.data.naming import parse_market_name, parse_msmt_name
from reidcli.errors import DataError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),  # Market-1501
        ("-1_c3s2_012345_01.jpg", (-1, 2)),  # junk
        ("0000_c6s4_002202_01.jpg", (0, 5)),  # distractor
        ("0001_c2_f0046182.jpg", (1, 1)),  # DukeMTMC-reID
        ("0013_c1_3.png", (13, 0)),  # CUHK03-NP
    ],
)
def test_market_names(name, expected):
    assert parse_market_name(name) == expected


@pytest.mark.parametrize(
    "name", ["Thumbs.db", "c1s1_0002.jpg", "0002_s1_c1.jpg", "0002_c0s1_000451_03.jpg", "x_c1.jpg"]
)
def test_bad_market_names_name_the_file_and_the_fix(name):
    with pytest.raises(DataError, match="Market-1501 naming") as e:
        parse_market_name(name)
    assert name in str(e.value)


def test_msmt_names():
    assert parse_msmt_name("0000_000_01_0303morning_0015_0.jpg") == 0
    assert parse_msmt_name("1040_019_15_0114noon_0151_2.jpg") == 14
    with pytest.raises(DataError, match="MSMT17 naming"):
        parse_msmt_name("0000_c1s1.jpg")


@given(pid=st.integers(0, 99999), cam=st.integers(1, 9), seq=st.integers(1, 9), frame=st.integers(0, 999999))
def test_market_round_trip(pid, cam, seq, frame):
    assert parse_market_name(f"{pid:04d}_c{cam}s{seq}_{frame:06d}_01.jpg") == (pid, cam - 1)


@given(pid=st.integers(0, 9999), cam=st.integers(1, 15))
def test_msmt_round_trip(pid, cam):
    assert parse_msmt_name(f"{pid:04d}_003_{cam:02d}_0303morning_0015_0.jpg") == cam - 1
