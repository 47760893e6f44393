"""``reid compare``: the paired bootstrap over queries, its checks, and the command."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from reidcli.errors import FormatError
from reidcli.report.compare import compare, read_per_query
from tests.conftest import run_cli, run_cli_here


def _table(ap, first, inp=None, n_invalid=0, paths=None) -> pd.DataFrame:
    n = len(ap) + n_invalid
    nan = [np.nan] * n_invalid
    return pd.DataFrame(
        {
            "query": range(n),
            "path": paths or [f"query/{i:04d}_c1s1_000000_00.jpg" for i in range(n)],
            "pid": np.arange(n) // 2 + 1,
            "camid": np.zeros(n, np.int64),
            "positives": [3] * len(ap) + [0] * n_invalid,
            "first_hit_rank": pd.array(list(first) + nan, dtype="Int64"),
            "AP": list(ap) + nan,
            "INP": list(ap if inp is None else inp) + nan,
        }
    )


def test_identical_evaluations_differ_by_nothing():
    a = _table(np.linspace(0.1, 0.9, 50), np.arange(50) % 3 + 1, n_invalid=4)
    out = compare(a, a.copy(), resamples=2000)
    assert out.queries == 50 and out.better == out.worse == 0
    for row in out.rows:
        assert row["A"] == row["B"] and row["delta"] == row["low"] == row["high"] == 0 and row["p"] == 1.0


def test_metrics_intervals_and_p_values_on_a_known_difference():
    """B adds a known per-query gain to A's AP: the difference is its mean (queries without a match left out),
    the interval is the bootstrap's ±1.96 standard errors, and a gain many standard errors from 0 has a tiny p;
    Rank-1 is the share of first hits at rank 1."""
    rng = np.random.default_rng(0)
    n = 400
    ap_a = rng.uniform(0.2, 0.8, n)
    gain = 0.02 + 0.05 * rng.standard_normal(n)
    first_a = np.where(np.arange(n) % 2 == 0, 1, 3)
    first_b = np.where(np.arange(n) % 4 == 3, 1, first_a)  # a quarter of the queries move to rank 1
    a = _table(ap_a, first_a, n_invalid=7)
    b = _table(ap_a + gain, first_b, n_invalid=7)
    out = compare(a, b, resamples=4000, seed=1)
    m, r1, minp = out.rows
    assert m["metric"] == "mAP" and m["A"] == pytest.approx(ap_a.mean()) and m["delta"] == pytest.approx(gain.mean())
    se = gain.std() / np.sqrt(n)
    assert m["low"] == pytest.approx(gain.mean() - 1.96 * se, abs=0.3 * se)
    assert m["high"] == pytest.approx(gain.mean() + 1.96 * se, abs=0.3 * se)
    assert m["p"] < 0.001 and out.better == int((gain > 0).sum()) and out.worse == int((gain < 0).sum())
    assert (r1["A"], r1["B"], r1["delta"]) == pytest.approx((0.5, 0.75, 0.25))
    assert r1["low"] > 0.15 and minp["delta"] == pytest.approx(gain.mean())


def test_a_difference_within_the_noise_has_a_large_p():
    rng = np.random.default_rng(2)
    ap = rng.uniform(0, 1, 300)
    noise = 0.1 * rng.standard_normal(300)
    out = compare(_table(ap, np.ones(300)), _table(ap + noise - noise.mean() + 1e-4, np.ones(300)), resamples=4000)
    assert out.rows[0]["low"] < 0 < out.rows[0]["high"] and out.rows[0]["p"] > 0.5


@pytest.mark.parametrize(
    "b, message",
    [
        (_table([0.5] * 9, [1] * 9), "A has 10 queries and B 9"),
        (_table([0.5] * 10, [1] * 10, paths=[f"query/x{i}.jpg" for i in range(10)]), "differ at query row 0 (path"),
    ],
)
def test_evaluations_of_other_queries_are_refused(b, message):
    with pytest.raises(FormatError, match=message.replace("(", r"\(")):
        compare(_table([0.5] * 10, [1] * 10), b)


def test_files_and_folders_are_read_and_bad_ones_refused(tmp_path):
    a = _table([0.5, 0.25], [1, 4], n_invalid=1)
    a.to_csv(tmp_path / "per_query.csv", index=False)
    back = read_per_query(tmp_path)  # the folder 'reid evaluate --out' wrote
    assert back["AP"].isna().sum() == 1 and back["path"].tolist() == a["path"].tolist()
    (tmp_path / "other.csv").write_text("query,AP\n0,0.5\n")
    with pytest.raises(FormatError, match="lacks the columns path, pid, camid, positives, first_hit_rank, INP"):
        read_per_query(tmp_path / "other.csv")
    damaged = a.astype({"AP": object})
    damaged.loc[1, "AP"] = "abc"
    damaged.to_csv(tmp_path / "damaged.csv", index=False)
    with pytest.raises(FormatError, match="column AP holds 'abc' at query row 1, not a number"):
        read_per_query(tmp_path / "damaged.csv")
    with h5py.File(tmp_path / "feats.h5", "w") as f:  # a features file where its evaluation belongs
        f.attrs["format"] = "reidcli.features"
    with pytest.raises(FormatError, match="is an HDF5 file, not an evaluation; evaluate it with 'reid evaluate"):
        read_per_query(tmp_path / "feats.h5")
    r = run_cli_here("compare", str(tmp_path), str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"Error: {tmp_path / 'missing'} not found; write it with 'reid evaluate")
    r = run_cli_here("compare", str(tmp_path), str(tmp_path / "per_query.csv"), "--json", "--resamples", "1000")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["queries"] == 2 and [m["delta"] for m in res["metrics"]] == [0.0, 0.0, 0.0]


def test_holm_adjusts_for_the_number_of_comparisons():
    from reidcli.report.compare import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01, max(2·0.03, ·), max(1·0.04, ·)
    assert holm([0.5]) == [0.5] and holm([0.4, 0.6]) == [0.8, 0.8]  # monotone, capped at 1


def test_several_evaluations_are_each_compared_with_the_first(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 0.8, 200)
    folders = []
    for name, gain in (("a", 0.0), ("same", 0.0), ("better", 0.05), ("worse", -0.02)):
        (tmp_path / name).mkdir()
        ap = np.clip(base + gain + (rng.normal(0, 0.01, 200) if gain else 0), 0, 1)
        _table(ap, np.where(ap > 0.5, 1, 2)).to_csv(tmp_path / name / "per_query.csv", index=False)
        folders.append(str(tmp_path / name))
    r = run_cli("compare", *folders, "--json", "--resamples", "2000")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["baseline"] == folders[0] and [c["evaluation"] for c in res["comparisons"]] == folders[1:]
    two = [compare(read_per_query(folders[0]), read_per_query(f), resamples=2000) for f in folders[1:]]
    for c, pair in zip(res["comparisons"], two, strict=True):
        for m, row in zip(c["metrics"], pair.rows, strict=True):  # each as the two-way comparison, p adjusted
            assert m["delta"] == pytest.approx(row["delta"]) and m["p"] == row["p"] and m["p_holm"] >= m["p"]
    same, better, worse = (c["metrics"][0] for c in res["comparisons"])
    assert same["delta"] == 0 and same["p_holm"] == 1.0
    assert better["low"] > 0.04 and better["p_holm"] < 0.01 and worse["high"] < 0 and worse["p_holm"] < 0.01
    table = run_cli_here("compare", *folders, "--resamples", "2000")
    assert table.returncode == 0 and "Holm-adjusted for 3 comparisons" in table.stdout
    one = run_cli_here("compare", folders[0])
    assert one.returncode == 1 and "give at least two evaluations" in one.stderr


def test_several_seeds_widen_the_interval_by_their_disagreement():
    """Seed 0 gains 0.2 AP on every query and seed 1 nothing: averaged, +0.1 on every query, which a bootstrap
    over queries alone calls certain. Drawing the seeds too covers both: the interval spans ~0 to ~0.2."""
    from reidcli.report.compare import compare_runs

    rng = np.random.default_rng(5)
    ap = rng.uniform(0.2, 0.7, 400)
    jitter = 0.01 * rng.standard_normal(400)
    a = _table(ap, np.ones(400))
    seed0, seed1 = _table(ap + 0.2 + jitter, np.ones(400)), _table(ap + jitter, np.ones(400))
    two = compare_runs([(a, seed0), (a, seed1)], resamples=4000).rows[0]
    assert two["delta"] == pytest.approx(0.1, abs=2e-3)
    assert two["low"] < 0.01 and two["high"] > 0.19 and two["p"] > 0.05
    # the same seeds agreeing: the interval is as narrow as one run's over queries
    agree = compare_runs([(a, seed0), (a, seed0)], resamples=4000).rows[0]
    one = compare(a, seed0, resamples=4000).rows[0]
    assert agree["high"] - agree["low"] == pytest.approx(one["high"] - one["low"], rel=0.15)
    assert agree["high"] - agree["low"] < 0.01 and agree["p"] < 1e-3
