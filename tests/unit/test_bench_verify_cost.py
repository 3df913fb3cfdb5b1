import pytest

from nbkit.bench.verify_cost import curve


@pytest.mark.slow
def test_verify_cost_reports_each_shape_over_a_plain_step():
    out = curve("torch", max_batch=2, repeats=1, threads=1)
    ratios = out["one_row_over_plain"]
    assert ratios[1] == 1.0 and set(ratios) >= {1, 2, 3, 4, 8, 16, 32, 64}
    assert all(r > 0 for r in ratios.values()) and ratios[64] > 1.0  # 64 tokens never cost less than one
    assert set(out["full_batch_over_plain"]) == {"2x1", "2x2", "2x3", "2x4"}
    assert set(out["heads_ms"]) == {1, 2}
