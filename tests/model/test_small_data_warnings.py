"""``styletag train`` on a catalog too small for its defaults says so (``worker.cli.training.small_data_warnings``):
a validation split too small to fit a temperature and thresholds on, and batches so large that an epoch is a
step or two. A catalog of ordinary size gets no warning."""

from __future__ import annotations

from worker.cli.training import MIN_STEPS_PER_EPOCH, MIN_VAL_ITEMS, small_data_warnings


def test_a_tiny_catalog_gets_both_warnings_with_a_batch_size_that_fits():
    lines = small_data_warnings(168, 20, 256)
    assert len(lines) == 2 and all(line.startswith("warning: ") and "\n" not in line for line in lines)
    assert "20 validation products" in lines[0]
    assert "1 optimizer step(s) per epoch" in lines[1] and "--batch-size 8 " in lines[1]
    # the suggested batch size gives at least MIN_STEPS_PER_EPOCH steps
    assert -(-168 // 8) >= MIN_STEPS_PER_EPOCH


def test_an_ordinary_catalog_gets_none():
    assert small_data_warnings(53_435, 6_565, 256) == []
    assert small_data_warnings(10_000, MIN_VAL_ITEMS, 256) == []
    assert small_data_warnings(5_000, 0, 256) == []  # no validation at all has its own warning


def test_the_suggestion_scales_with_the_catalog():
    line = small_data_warnings(2_000, 1_000, 256)[0]
    assert "8 optimizer step(s)" in line and "--batch-size 64 " in line
    assert -(-2_000 // 64) >= MIN_STEPS_PER_EPOCH
