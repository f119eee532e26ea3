"""MoE routing health by modality on the host: the starved-expert check,
the TensorBoard summaries and the Logging hook that runs them
(mmjax/train/routing_health.py, mmjax/train/hooks.py)."""

import json

import numpy as np
import pytest

from mmjax.train.routing_health import StarvedExperts, load_summary, routing_scalars

BALANCED = [0.25, 0.25, 0.25, 0.25]
STARVED = [0.30, 0.30, 0.39, 0.01]  # expert 3 at 4% of its fair load 1/4


def record(image=(BALANCED, BALANCED), text=(BALANCED, BALANCED), image_tokens=60.0, text_tokens=300.0):
    """A log step's MoE record for 2 MoE layers of 4 experts."""
    n = text_tokens + image_tokens
    return {"expert_fraction": [list((text_tokens * np.asarray(t) + image_tokens * np.asarray(i)) / n)
                                for t, i in zip(text, image)],
            "expert_fraction_text": [list(layer) for layer in text],
            "expert_fraction_image": [list(layer) for layer in image],
            "dropped_fraction_text": [0.01, 0.02], "dropped_fraction_image": [0.10, 0.20],
            "router_entropy_text": [1.2, 1.3], "router_entropy_image": [0.4, 0.5],
            "moe_tokens_text": text_tokens, "moe_tokens_image": image_tokens}


def test_load_summary():
    assert load_summary(BALANCED) == (1.0, 1.0)
    assert load_summary(STARVED) == pytest.approx((1.56, 0.04))


def test_starvation_warns_after_exactly_n_windows_names_it_and_resets_on_recovery():
    check = StarvedExperts(share=0.1, windows=3, layer_names=["MoE layer 0 (decoder layer 1)",
                                                              "MoE layer 1 (decoder layer 3)"])
    starved = record(image=(BALANCED, STARVED))
    for window in (1, 2):
        metrics, messages = check.update(starved)
        assert messages == [] and metrics["moe_starved_experts"] == 0, window
    metrics, messages = check.update(starved)  # third consecutive window
    assert len(messages) == 1
    assert "expert 3 of MoE layer 1 (decoder layer 3)" in messages[0] and "image tokens" in messages[0]
    assert "3 consecutive log windows" in messages[0] and messages[0].startswith("warning:")
    assert metrics["moe_starved_experts"] == metrics["moe_starved_experts_image"] == 1
    assert metrics["moe_starved_experts_text"] == 0 and metrics["moe_starved"] == [[1, 3, "image"]]
    metrics, messages = check.update(starved)  # still starved: counted, not warned again
    assert messages == [] and metrics["moe_starved"] == [[1, 3, "image"]]
    metrics, messages = check.update(record())  # recovers
    assert metrics["moe_starved_experts"] == 0 and len(messages) == 1 and "recovered" in messages[0]
    for window in (1, 2):  # the count starts again
        metrics, messages = check.update(starved)
        assert messages == [] and metrics["moe_starved_experts"] == 0
    assert len(check.update(starved)[1]) == 1


def test_starvation_needs_consecutive_windows_and_skips_windows_without_the_modality():
    check = StarvedExperts(share=0.1, windows=3)
    starved, balanced = record(image=(BALANCED, STARVED)), record()
    no_images = record(image=([0.0] * 4, [0.0] * 4), image_tokens=0.0)  # undefined: neither counts nor resets
    assert [check.update(r)[1] for r in (starved, starved, balanced, starved, starved)] == [[]] * 5
    messages = [check.update(r)[1] for r in (no_images, no_images, starved)]
    assert messages[:2] == [[], []] and len(messages[2]) == 1 and "MoE layer 1" in messages[2][0]
    # Text starvation is separate from image starvation; the share sets the threshold.
    check = StarvedExperts(share=0.05, windows=1)
    metrics, messages = check.update(record(text=(STARVED, BALANCED)))
    assert metrics["moe_starved"] == [[0, 3, "text"]] and "text tokens" in messages[0]
    assert StarvedExperts(share=0.01, windows=1).update(record(text=(STARVED, BALANCED)))[0]["moe_starved"] == []
    assert StarvedExperts(windows=0).update(record(image=(STARVED, STARVED))) == ({}, [])
    assert StarvedExperts().update({"loss": 1.0}) == ({}, [])  # dense run


def test_routing_scalars_per_layer_and_modality():
    scalars = routing_scalars(record(image=(BALANCED, STARVED)))
    assert scalars["moe_layer1/image/load_min_share"] == pytest.approx(0.04)
    assert scalars["moe_layer1/image/load_max_over_mean"] == pytest.approx(1.56)
    assert scalars["moe_layer0/text/load_max_over_mean"] == pytest.approx(1.0)
    assert scalars["moe_layer1/image/dropped_fraction"] == pytest.approx(0.20)
    assert scalars["moe_layer0/text/router_entropy"] == pytest.approx(1.2)
    assert scalars["moe_layer0/all/router_entropy"] == pytest.approx((300 * 1.2 + 60 * 0.4) / 360)
    assert scalars["moe_layer1/all/dropped_fraction"] == pytest.approx((300 * 0.02 + 60 * 0.20) / 360)
    assert len(scalars) == 2 * 3 * 4 and all(isinstance(v, float) for v in scalars.values())
    no_images = routing_scalars(record(image=([0.0] * 4, [0.0] * 4), image_tokens=0.0))
    assert not any("/image/" in k for k in no_images) and len(no_images) == 2 * 2 * 4
    assert routing_scalars({"expert_fraction": [BALANCED]}) == {}


def test_logging_hook_records_starved_experts_and_writes_tensorboard_summaries(tmp_path, capsys):
    from conftest import small_config
    from mmjax.train import hooks
    from mmjax.train.metrics import MetricsWriter
    from mmjax.train.timing import StepTimer

    c = small_config()
    c.model.decoder.layers = 4
    c.model.decoder.moe.update(dict(num_experts=4, moe_every=2))
    c.train.moe_starved_windows = 2
    writer = MetricsWriter(tmp_path, enable_tensorboard=False)
    tb = []
    writer._tb = type("TB", (), {"add_scalar": lambda self, *a: tb.append(a), "close": lambda self: None})()
    run = hooks.Run(c, str(tmp_path), None, writer, None, StepTimer(),
                    {"model_flops_per_step": 1.0, "peak_flops_per_device": 1.0})
    logging = hooks.Logging(run, total_steps=3)
    for step in (1, 2, 3):
        run.timer.add(0.1, 0.0, 0.0, 1)
        metrics = {"loss": np.float32(2.0), "dropped_fraction": np.float32(0.05),
                   **{k: np.asarray(v, np.float32) for k, v in record(image=(BALANCED, STARVED)).items()}}
        logging.after_step(hooks.StepResult(step, metrics, 2.0, np.zeros(3), {}))
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["moe_starved_experts"] for r in lines] == [0, 1, 1]
    assert lines[1]["moe_starved"] == [[1, 3, "image"]]
    assert np.asarray(lines[0]["expert_fraction_image"]).shape == (2, 4)
    out = capsys.readouterr().out
    assert out.count("warning: MoE routing: expert 3 of MoE layer 1 (decoder layer 3) is starved of image") == 1
    assert "experts max/mean 1.09 (text 1.00, image 1.56)" in out
    tags = {(tag, step) for tag, _, step in tb}
    assert ("moe_layer1/image/load_min_share", 3) in tags and ("moe_starved_experts", 2) in tags
