import pytest

from nbkit.bench.verify_cost import curve


@pytest.mark.slow
def test_verify_cost_reports_each_shape_over_a_plain_step():
    out = curve("torch", max_batch=2, repeats=1, threads=1)
    ratios, ms = out["one_row_over_plain"], out["one_row_ms"]
    assert set(ratios) == set(ms) and set(ratios) >= {1, 2, 3, 4, 8, 16, 32, 64}
    assert all(v > 0 for v in ms.values())
    for n, r in ratios.items():  # each ratio is its shape's measured time over the plain step's (2-decimal rounding)
        assert r == pytest.approx(ms[n] / ms[1], abs=0.01 + 0.01 * r), (n, r, ms)
    assert all(r > 0 for r in ratios.values()) and ratios[64] > 1.0  # 64 tokens never cost less than one
    assert set(out["full_batch_over_plain"]) == {"2x1", "2x2", "2x3", "2x4"}
    assert set(out["heads_ms"]) == {1, 2}
