"""benchmarks/digits_step.py: one row per variant, the projections follow from the timed forward, and
--record inserts the table into a benchmarks file."""

import pytest

from benchmarks import digits_step


def test_rows_and_record(tmp_path):
    path = tmp_path / "benchmarks.md"
    rows, (decoded, cached) = digits_step.main(["--rounds", "1", "--steps", "1", "--forwards", "1", "--batches", "1",
                                                "--record", str(path)])
    assert [r[0] for r in rows] == list(digits_step.VARIANTS)
    assert 0 < cached < decoded  # the cache skips the PNG decode and resize
    for _, step, rate, with_decoded, with_cached, fwd, point, scored in rows:
        assert rate == pytest.approx(1000 / step)
        assert with_decoded == pytest.approx(1000 / (step + decoded)) and with_cached == pytest.approx(
            1000 / (step + cached))
        assert point == pytest.approx(2 * 50 * fwd / 1000) and scored == pytest.approx(4 * 100 * 3 * fwd / 1000)
    text = path.read_text()
    assert "## Digits study: time per variant" in text and "| derf |" in text and "from the cache" in text
