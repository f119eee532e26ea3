"""Models by name: the loop, the step and the benchmarks reach a model only
through `config.model.name`; a text-only decoder trains through the same loop."""

import json

import numpy as np
import pytest
from conftest import small_config

from experiments.text_lm import get_config as text_lm_config
from mmjax.models import MODELS, model_spec
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.evaluators import EVALUATORS, enabled_evaluators
from mmjax.train.loop import build_step, train


def _small_text_lm(steps=60):
    c = text_lm_config()
    c.model.decoder.layers = 1
    c.model.decoder.mlp = 256
    c.data.seq_len = 64
    c.data.global_batch = 8
    c.train.steps = steps
    c.train.log_every = 10
    c.train.checkpoint_every = steps
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 5
    return c


def test_registry_names_the_models_and_their_inputs():
    assert {"mm1", "text_lm"} <= set(MODELS)
    assert "images" in model_spec(small_config().model).inputs
    assert model_spec(text_lm_config().model).inputs == ("tokens", "segment_ids", "positions")
    c = small_config().model
    c.name = "gpt9"
    with pytest.raises(ValueError, match=r"config.model.name='gpt9' is not a registered model; choose one of"):
        model_spec(c)


def test_step_inputs_follow_the_model():
    mm1 = small_config()
    text = _small_text_lm()
    for config, expect_images in ((mm1, True), (text, False)):
        setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
        assert ("images" in setup.batch_shardings) == expect_images
        assert {"targets", "loss_mask", "tokens"} <= set(setup.batch_shardings)
        top = set(setup.abstract_params.keys())
        assert top == ({"vit", "connector", "decoder"} if expect_images else {"decoder"})


def test_text_lm_trains_through_the_same_loop(tmp_path):
    c = _small_text_lm()
    summary = train(c, str(tmp_path))
    assert summary["loss_last10_mean"] < 0.75 * summary["loss_first10_mean"]
    assert summary["eval"] == {}  # the caption check is off (and needs images)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]
    assert logged[-1]["mix_text"] == 1.0 and np.isfinite(logged[-1]["mfu"])


def test_evaluators_are_switched_on_by_name():
    assert "caption_accuracy" in EVALUATORS
    c = small_config()
    assert enabled_evaluators(c) == ["caption_accuracy"]
    c.eval.caption_accuracy = False
    assert enabled_evaluators(c) == []
    c.eval.bleu4 = True
    with pytest.raises(ValueError, match=r"config.eval.bleu4 names no registered evaluator"):
        enabled_evaluators(c)
