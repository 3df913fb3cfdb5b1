"""nbkit.bench.ab: ABBA order, per-configuration median ratios, and the CLI around a stubbed bench run."""

import json

import pytest

from nbkit.bench import ab


def _result(off: float, adaptive: float) -> dict:
    return {"runs": [{"name": "c1-off", "tokens_per_s": off}, {"name": "c1-adaptive", "tokens_per_s": adaptive}],
            "ratios": {"adaptive_over_off_c1": adaptive / off}}


def test_abba_order_alternates_and_balances():
    order = ab.abba_order(3)
    assert order == ["before", "after", "after", "before", "before", "after"]
    assert order.count("before") == order.count("after") == 3


def test_compare_takes_the_median_of_per_round_ratios():
    results = {"before": [_result(10, 12), _result(20, 24), _result(10, 11)],
               "after": [_result(11, 12), _result(20, 30), _result(9, 11)]}
    s = ab.compare(results)
    assert s["configs"]["c1-off"]["per_round"] == [1.1, 1.0, 0.9]
    assert s["configs"]["c1-off"]["after_over_before"] == 1.0
    assert s["configs"]["c1-adaptive"]["after_over_before"] == 1.0  # ratios 1.0, 1.25, 1.0
    assert s["bench_ratios"]["adaptive_over_off_c1"]["before"] == 1.2
    assert "| c1-off | 10.0 |" in ab.table(s)


def test_cli_runs_both_checkouts_in_abba_order(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    for c in (old, new):
        (c / "nbkit").mkdir(parents=True)
        (c / "nbkit" / "__main__.py").write_text("")
    calls = []

    def fake(checkout, args):
        calls.append((checkout.name, args))
        return _result(10.0, 12.0) if checkout == old else _result(10.5, 12.0)

    monkeypatch.setattr(ab, "run_bench", fake)
    assert ab.main(["--before", str(old), "--after", str(new), "--rounds", "2", "--out", str(tmp_path / "o"),
                    "--", "--no-mixed"]) == 0
    assert [c[0] for c in calls] == ["old", "new", "new", "old"]
    assert all(c[1] == ["--no-mixed"] for c in calls)
    summary = json.loads((tmp_path / "o" / "ab.json").read_text())
    assert summary["configs"]["c1-off"]["after_over_before"] == 1.05


def test_cli_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    with pytest.raises(SystemExit):
        ab.main(["--before", str(tmp_path), "--after", str(tmp_path)])
