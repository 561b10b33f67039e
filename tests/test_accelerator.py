"""benchmarks/accelerator.py: the roofline arithmetic, and `--quick` end to end on whatever device is here."""

import json

import pytest

from benchmarks import accelerator as A


def test_roofline_picks_the_slower_bound():
    peak, bw = A.CHIPS["H100 SXM"]
    row = {"batch": 4, "gflop_per_edit": 100.0, "xla_mib_accessed_per_edit": 1.0}
    est = A.roofline(row, weight_bytes=8e9, chip="H100 SXM")  # 8 GB of weights: memory-bound at E = 4
    assert est["bound"] == "memory"
    assert est["edits_per_s"] == pytest.approx(4 / (8e9 / bw))
    est = A.roofline(dict(row, gflop_per_edit=1e6), weight_bytes=8e9, chip="H100 SXM")
    assert est["bound"] == "compute"
    assert est["edits_per_s"] == pytest.approx(4 / (4 * 1e15 / peak))
    # XLA's byte count wins where it exceeds the weights.
    big = A.roofline(dict(row, xla_mib_accessed_per_edit=1e6), weight_bytes=1.0, chip="TPU v5e")
    assert big["memory_ms"] == pytest.approx(4 * 1e6 * 2**20 / A.CHIPS["TPU v5e"][1] * 1e3)


def test_quick_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "acc.json"
    out = A.main(["--quick", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert saved["device"] == out["device"] and saved["quick"]
    res = saved["results"]["world"]
    assert res["dtype"] == "bfloat16" and res["quality"] is None
    (row,) = res["throughput"]
    assert row["batch"] == 2 and row["edits_per_s"] > 0 and row["images_per_edit"] > 0
    assert 1.0 <= row["x_floor"] < 2.0
    assert set(row["roofline"]) == set(A.CHIPS) and all(r["edits_per_s"] > 0 for r in row["roofline"].values())
    assert "H100 SXM est." in capsys.readouterr().out
