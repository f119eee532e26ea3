"""The evaluation tasks through the evaluator registry (the path the training
loop and `python -m mmjax.eval` take): COCO- and VQAv2-format files written
here, bad entries skipped and counted, scores recomputed from the written
predictions, generation on the mesh equal to plain greedy decoding, and
multiple-choice log-likelihoods equal to a direct forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import small_config
from mmjax.data import shapes
from mmjax.data.pipeline import default_tokenizer
from mmjax.errors import ConfigError
from mmjax.eval.batching import pad_batch
from mmjax.eval.caption_scores import cider_d, tokenize_caption
from mmjax.eval.tasks import cut_at_stop
from mmjax.eval.task_settings import caption_task, choice_task, vqa_task
from mmjax.eval.vqa_accuracy import vqa_accuracy
from mmjax.generate.decode import Sampling, jitted_generate
from mmjax.parallel import get_layout, make_mesh
from mmjax.train.evaluators import make_evaluators
from mmjax.train.loop import build_step
from mmjax.train.state import init_train_state


def _write_fixtures(root):
    """Six shapes scenes as PNGs with COCO captions and VQAv2 questions, plus
    a missing image, an undecodable one and a question without answers."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": []}
    questions, answers = {"questions": []}, {"annotations": []}
    for i in range(6):
        scene = shapes.sample_scene(rng)
        Image.fromarray(shapes.render_scene(scene, 40, rng)).save(images / f"img_{i:03d}.png")
        coco["images"].append({"id": i, "file_name": f"img_{i:03d}.png"})
        coco["annotations"] += [{"image_id": i, "caption": shapes.caption(scene)},
                                {"image_id": i, "caption": f"{len(scene)} shapes"}]
        questions["questions"].append({"question_id": 100 + i, "image_id": i, "question": "how many shapes?"})
        answers["annotations"].append({"question_id": 100 + i, "multiple_choice_answer": str(len(scene)),
                                       "answers": [{"answer": str(len(scene))}] * 10})
    (images / "img_007.png").write_bytes(b"garbage")
    coco["images"] += [{"id": 6, "file_name": "img_006.png"}, {"id": 7, "file_name": "img_007.png"}]
    coco["annotations"] += [{"image_id": 6, "caption": "gone"}, {"image_id": 7, "caption": "broken"}]
    questions["questions"].append({"question_id": 200, "image_id": 1, "question": "unanswered?"})
    for name, data in (("captions.json", coco), ("questions.json", questions), ("answers.json", answers)):
        (root / name).write_text(json.dumps(data))
    lines = [{"context": "the colour of the sky is", "choices": ["blue", "loud", "seven"], "gold": 0},
             {"context": "two plus two is", "choices": ["four", "a circle"], "gold": 0},
             {"context": "a red circle is", "choices": ["round", "square", "sour", "late"], "gold": 0}]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture(scope="module")
def setup_and_params(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_files")
    _write_fixtures(root)
    c = small_config()
    c.eval.caption_accuracy = False
    common = dict(images=str(root / "images"), shots=(0, 2), max_new_tokens=6, batch_size=8, blank_images=True)
    c.evaluators.coco = caption_task(annotations=str(root / "captions.json"), **common)
    c.evaluators.vqa = vqa_task(questions=str(root / "questions.json"), annotations=str(root / "answers.json"),
                                image_pattern="img_{image_id:03d}.png", **common)
    c.evaluators.mc = choice_task(path=str(root / "mc.jsonl"), shots=(0, 1), batch_size=8)
    for name in ("coco", "vqa", "mc"):
        c.eval[name] = True
    setup, _ = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
    state = init_train_state(c, setup)
    tok = default_tokenizer(c.data)
    evaluators = make_evaluators(c, setup, tok, print)
    return c, setup, state["params"], tok, evaluators


def test_coco_captions_skip_bad_images_and_score_like_the_reference(setup_and_params):
    c, setup, params, tok, evaluators = setup_and_params
    task = evaluators["coco"]
    metrics = task(params)
    assert metrics["skipped"] == 2  # the missing and the undecodable image
    assert metrics["scored@0shot"] == metrics["scored@2shot"] == 6
    rows = [r for r in task.predictions if r["shots"] == 0 and not r["blank_images"]]
    assert [r["id"] for r in rows] == [str(i) for i in range(6)]
    preds = {r["id"]: tokenize_caption(r["prediction"]) for r in rows}
    refs = {r["id"]: [tokenize_caption(x) for x in r["references"]] for r in rows}
    assert metrics["cider@0shot"] == pytest.approx(100 * cider_d(preds, refs)[0], abs=1e-9)
    assert {r["shots_used"] for r in task.predictions if r["shots"] == 2} == {2}
    assert "blank_images/cider@2shot" in metrics


@pytest.mark.slow
def test_generation_on_the_mesh_equals_plain_greedy_decoding(setup_and_params):
    c, setup, params, tok, evaluators = setup_and_params
    task = evaluators["coco"]
    prompts, items, _ = task.prompts(2)
    model = nnx.merge(setup.graphdef, jax.device_get(params))
    batch = {k: jnp.asarray(v) for k, v in pad_batch(prompts, 8, (c.data.image_size,) * 2 + (3,)).items()}
    sampling = task.generator.sampling
    assert sampling.stop_ids[0] == tok.eos_id and len(sampling.stop_ids) > 1  # <eos> and the newline tokens
    tokens, counts = jitted_generate(model, Sampling(max_new_tokens=6, stop_ids=sampling.stop_ids))(batch)
    want = [cut_at_stop(tok.decode([t for t in row[:n] if t != tok.eos_id]), ("\n",))
            for row, n in zip(np.asarray(tokens), np.asarray(counts))]
    task(params)
    got = [r["prediction"] for r in task.predictions if r["shots"] == 2 and not r["blank_images"]]
    assert got == want[:len(prompts)]


@pytest.mark.slow
def test_vqav2_questions_without_answers_are_skipped_and_accuracy_is_official(setup_and_params):
    _, _, params, _, evaluators = setup_and_params
    task = evaluators["vqa"]
    metrics = task(params)
    assert metrics["skipped"] == 1 and metrics["scored@0shot"] == 6
    rows = [r for r in task.predictions if r["shots"] == 0 and not r["blank_images"]]
    assert metrics["accuracy@0shot"] == pytest.approx(
        np.mean([100 * vqa_accuracy(r["prediction"], r["references"]) for r in rows]))


def test_multiple_choice_loglikelihoods_equal_a_direct_forward_pass(setup_and_params):
    c, setup, params, tok, evaluators = setup_and_params
    task = evaluators["mc"]
    metrics = task(params)
    assert metrics["scored@0shot"] == 3 and metrics["dropped_shots@1shot"] == 0
    model = nnx.merge(setup.graphdef, jax.device_get(params))
    forward = nnx.jit(lambda m, t, s, p: m.decoder.forward(m.decoder.embed(t), s, p)[0])
    for row, item in zip([r for r in task.predictions if r["shots"] == 0], task.items):
        for choice, got in zip(item.choices, row["loglikelihoods"]):
            context = [tok.bos_id] + tok.encode(item.context)
            cont = tok.encode(" " + choice)
            ids = jnp.asarray([context + cont])
            logp = jax.nn.log_softmax(forward(model, ids, jnp.ones_like(ids), jnp.arange(ids.shape[1])[None]))
            want = sum(float(logp[0, len(context) - 1 + i, t]) for i, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)
    accuracy = 100 * np.mean([r["prediction"] == r["gold"] for r in task.predictions if r["shots"] == 0])
    assert metrics["accuracy@0shot"] == pytest.approx(accuracy)


def test_more_shots_than_the_support_set_is_one_sentence(setup_and_params):
    c, setup, _, tok, _ = setup_and_params
    c = c.copy_and_resolve_references()
    c.evaluators.coco.shots = (0, 9)
    with pytest.raises(ConfigError, match=r"config.evaluators.coco.shots=\(0, 9\) asks for 9 demonstrations but "
                                          r"the support set holds 7"):
        make_evaluators(c, setup, tok, print)
