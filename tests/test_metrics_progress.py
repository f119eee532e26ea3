"""The progress line shows what a user waits for (mmjax/train/metrics.py)."""

from mmjax.train.metrics import progress_line

BASE = {"loss": 2.5, "step_time_s": 0.4, "data_wait_s": 0.01, "tokens_per_s": 5000.0, "mfu": 0.03}


def test_dense_line_has_no_expert_figure():
    line = progress_line(10, 100, BASE, 36.0)
    assert line.startswith("step 10/100 | loss 2.5000") and "experts" not in line and line.endswith("ETA 36s")


def test_moe_line_shows_the_worst_layers_load_balance_and_drops():
    record = dict(BASE, expert_fraction=[[0.25, 0.25, 0.25, 0.25], [0.5, 0.2, 0.2, 0.1]], dropped_fraction=0.0125)
    line = progress_line(10, 100, record, 36.0)
    assert " | experts max/mean 2.00, dropped 1.2% | " in line


def test_moe_line_shows_each_present_modalitys_worst_layer():
    record = dict(BASE, expert_fraction=[[0.25, 0.25, 0.25, 0.25], [0.5, 0.2, 0.2, 0.1]], dropped_fraction=0.0125,
                  expert_fraction_text=[[0.3, 0.2, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
                  expert_fraction_image=[[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]],
                  moe_tokens_text=300.0, moe_tokens_image=60.0)
    line = progress_line(10, 100, record, 36.0)
    assert " | experts max/mean 2.00 (text 1.20, image 2.80), dropped 1.2% | " in line
    no_images = dict(record, moe_tokens_image=0.0)
    assert " | experts max/mean 2.00 (text 1.20), dropped 1.2% | " in progress_line(10, 100, no_images, 36.0)
