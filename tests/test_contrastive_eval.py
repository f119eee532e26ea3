"""Zero-shot classification and image<->text retrieval of a dual encoder
(`mmjax.train.contrastive_eval`): recall@K and zero-shot accuracy equal
references written here (sorting, loops), including tied scores and repeated
captions; inside `train()` they land as `eval/<name>/<metric>` and equal the
references on the checkpoint's model called eagerly (its jitted embeddings
are replicated on the mesh); a model that does not train on pairs, or reads
no text, is skipped with the reason; bad settings are refused."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from jax.sharding import PartitionSpec

from experiments.clip_tiny import get_config as clip_tiny_config
from mmjax.data.labels import label_set
from mmjax.data.pairs import PairBuilder, make_pair_dataset
from mmjax.data.pipeline import default_tokenizer
from mmjax.eval.runner import load_params
from mmjax.errors import Refusal
from mmjax.models.registry import MODELS, ModelSpec
from mmjax.parallel import get_layout, make_mesh
from mmjax.train import contrastive_eval as ce
from mmjax.train.config_checks import check_config
from mmjax.train.evaluators import make_evaluators
from mmjax.train.loop import build_step, train

N_EVAL = 40  # not a multiple of the batch: the last batch is cut


# ------------------------------------------------------------------ references

def _reference_rank(scores_row: np.ndarray, correct_row: np.ndarray) -> int:
    """Candidates sorted by score, descending, right ones after wrong ones on a
    tie; the position of the first right one (= wrong ones placed before it)."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], bool(correct_row[j])))
    return next(pos for pos, j in enumerate(order) if correct_row[j])


def _reference_recall(scores: np.ndarray, correct: np.ndarray, k: int) -> float:
    return float(np.mean([_reference_rank(scores[i], correct[i]) < k for i in range(len(scores))]))


def _reference_retrieval(image: np.ndarray, text: np.ndarray, captions: list) -> dict:
    n = len(captions)
    scores = image.astype(np.float64) @ text.astype(np.float64).T
    own = np.eye(n, dtype=bool)
    caption = np.array([[captions[i] == captions[j] for j in range(n)] for i in range(n)])
    out = {}
    for direction, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        for k in (1, 5, 10):
            out[f"{direction}/recall@{k}"] = _reference_recall(s, own, k)
            out[f"{direction}/caption_recall@{k}"] = _reference_recall(s, caption, k)
    out.update({f"chance@{k}": min(k / n, 1.0) for k in (1, 5, 10)})
    out["duplicate_captions"] = float(np.mean([captions.count(c) > 1 for c in captions]))
    out["pairs"] = n
    return out


def _reference_zero_shot(image: np.ndarray, prompts: np.ndarray, labels: np.ndarray,
                         num_classes: int, num_templates: int) -> dict:
    """prompts `[classes * templates, d]` class-major."""
    classes = []
    for c in range(num_classes):
        v = sum(prompts[c * num_templates + t].astype(np.float64) for t in range(num_templates)) / num_templates
        classes.append(v / np.sqrt((v * v).sum()))
    scores = image.astype(np.float64) @ np.stack(classes).T
    out = {"top1_accuracy": float(np.mean(np.argmax(scores, axis=1) == labels))}
    if num_classes > 5:
        top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        out["top5_accuracy"] = float(np.mean([labels[i] in top5[i] for i in range(len(labels))]))
    out.update(chance=1 / num_classes, examples=len(labels))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _assert_metrics(got: dict, want: dict, tol: float = 1e-12):
    assert set(got) >= set(want), sorted(set(want) - set(got))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=tol), key


# ------------------------------------------------------------------ ranking


def test_recall_matches_a_sorting_reference_with_ties_and_repeated_captions():
    rng = np.random.default_rng(0)
    n, d = 37, 8
    captions = [f"caption {c}" for c in rng.integers(0, 20, n)]  # many repeats
    # Texts of one caption embed alike; coarse values make many exact ties besides.
    text_of = {c: np.round(_unit(rng.normal(size=d)) * 2) / 2 for c in set(captions)}
    text = np.stack([text_of[c] for c in captions])
    image = np.round(rng.normal(size=(n, d)) * 2) / 2
    image[3] = 0.0  # one image ties with every text
    tokens = np.array([[int(c.split()[1]), 7] for c in captions], np.int32)
    got = ce.retrieval_metrics(image, text, tokens)
    want = _reference_retrieval(image, text, captions)
    _assert_metrics(got, want)
    assert 0 < want["duplicate_captions"] < 1
    # ties count against the query: the all-tied image is never a hit below rank n - 1
    assert ce.answer_ranks(image[3:4] @ text.T, np.eye(n, dtype=bool)[3:4])[0] == n - 1
    # repeated captions make paired-index recall harder than caption recall
    assert want["image_to_text/recall@1"] < want["image_to_text/caption_recall@1"]


def test_answer_ranks_on_random_scores_and_non_finite():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(50, 30)).astype(np.float64)  # ties everywhere
    correct = rng.random((50, 30)) < 0.1
    correct[np.arange(50), rng.integers(0, 30, 50)] = True
    got = ce.answer_ranks(scores, correct)
    assert got.tolist() == [_reference_rank(scores[i], correct[i]) for i in range(50)]
    scores[0, correct[0]] = np.nan
    assert ce.answer_ranks(scores, correct)[0] == 30  # no finite right answer: a miss at every K
    for k in (1, 5, 10):
        assert ce.recall_at(got, k) == pytest.approx(_reference_recall(scores[1:], correct[1:], k)
                                                     * 49 / 50 + (got[0] < k) / 50)


@pytest.mark.parametrize("num_classes", [4, 7])
def test_zero_shot_metrics_match_numpy(num_classes):
    rng = np.random.default_rng(num_classes)
    templates, n, d = 3, 60, 16
    prompts = _unit(rng.normal(size=(num_classes * templates, d))).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    means = ce.class_embeddings(prompts, num_classes)
    image = _unit(means[labels] + rng.normal(size=(n, d)) * 0.3).astype(np.float32)  # better than chance
    got = ce.zero_shot_metrics(image, means, labels)
    want = _reference_zero_shot(image, prompts, labels, num_classes, templates)
    _assert_metrics(got, want)
    assert ("top5_accuracy" in got) == (num_classes > 5)
    assert got["top1_accuracy"] > 2 / num_classes


def test_prompt_tokens_are_written_as_the_pair_pipeline_writes_captions():
    tok = default_tokenizer(small_config().data)
    texts = ["one shape. top left: red circle.", "a much longer caption " * 5]
    tokens, segment_ids = ce.tokenize_texts(tok, texts, 16)
    builder = PairBuilder(tok, 16, 8)
    for i, t in enumerate(texts):
        pair = builder({"segments": [{"image": np.zeros((8, 8, 3), np.uint8)}, {"text": t}]})
        np.testing.assert_array_equal(tokens[i], pair["tokens"])
        np.testing.assert_array_equal(segment_ids[i], pair["segment_ids"])


# ------------------------------------------------------------------ on the model


def _dual_config(steps: int = 4):
    c = clip_tiny_config("clip")
    c.model.vit.depth = 1
    c.model.decoder.layers = 1
    c.data.global_batch = 16
    c.data.seq_len = 24
    c.optimizer.update(lr=3e-3, warmup_steps=2)
    c.train.update(steps=steps, log_every=1, checkpoint_every=steps, eval_every=2)
    c.evaluators.zero_shot.update(num_examples=N_EVAL, templates=("{}", "one shape. top left: red {}."))
    c.evaluators.retrieval.num_examples = N_EVAL
    c.eval = dict(zero_shot=True, retrieval=True)
    return c


def _eager_embeddings(graphdef, params, images: np.ndarray, tokens: np.ndarray, segment_ids: np.ndarray):
    """The model rebuilt from `params` on one device, called without jit."""
    model = nnx.merge(graphdef, jax.device_get(params))
    return (np.asarray(model.embed_images(images)),
            np.asarray(model.embed_texts(tokens, segment_ids > 0)))


def _eval_records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if any(k.startswith("eval/") for k in r)]


def _logged(record: dict, name: str) -> dict:
    return {k[len(f"eval/{name}/"):]: v for k, v in record.items() if k.startswith(f"eval/{name}/")}


@pytest.mark.slow
def test_train_logs_the_evaluators_and_they_equal_the_model_called_eagerly(tmp_path):
    c = _dual_config(4)
    summary = train(c, str(tmp_path))
    records = _eval_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4]  # a fresh run's start, eval_every, the end
    for r in records:
        assert r["eval/zero_shot/chance"] == 0.25 and r["eval/zero_shot/examples"] == N_EVAL
        assert "eval/zero_shot/top5_accuracy" not in r  # 4 classes
        assert r["eval/retrieval/pairs"] == N_EVAL and r["eval/retrieval/chance@1"] == 1 / N_EVAL
    assert summary["eval"]["initial"] == {k[len("eval/"):]: v for k, v in records[0].items() if k != "step"}
    assert summary["eval"]["final"] != summary["eval"]["initial"]

    # The logged final metrics, recomputed from the step-4 checkpoint with the model called eagerly.
    tok = default_tokenizer(c.data)
    setup, params, step = load_params(c, str(tmp_path), 0, [])
    assert step == 4

    # retrieval: the run's caption stream, split "eval" (not the training pairs)
    held = next(iter(make_pair_dataset(c.data, tok, batch_size=64, split="eval")))
    image, text = _eager_embeddings(setup.graphdef, params,
                                    *(held[k][:N_EVAL] for k in ("image", "tokens", "segment_ids")))
    captions = [tuple(t) for t in held["tokens"][:N_EVAL].tolist()]
    want = _reference_retrieval(image, text, captions)
    _assert_metrics(_logged(records[-1], "retrieval"), want, tol=1e-9)
    train_rows = next(iter(make_pair_dataset(c.data, tok, batch_size=N_EVAL)))
    assert not np.array_equal(train_rows["image"], held["image"][:N_EVAL])

    # zero-shot: procedural:classes images of split "eval", the classes in both templates
    classes_data = c.data.copy_and_resolve_references()
    classes_data.sources.caption = "procedural:classes"
    held = next(iter(make_pair_dataset(classes_data, tok, batch_size=64, split="eval")))
    classes, templates = label_set(c.data).classes, c.evaluators.zero_shot.templates
    tokens, segment_ids = ce.tokenize_texts(tok, [t.format(k) for k in classes for t in templates], c.data.seq_len)
    labels = held["class_id"][:N_EVAL]
    assert (labels >= 0).all() and set(labels.tolist()) == set(range(len(classes)))
    image, _ = _eager_embeddings(setup.graphdef, params, held["image"][:N_EVAL], tokens[:1], segment_ids[:1])
    _, prompts = _eager_embeddings(setup.graphdef, params, held["image"][:1], tokens, segment_ids)
    want = _reference_zero_shot(image, prompts, labels, len(classes), len(templates))
    _assert_metrics(_logged(records[-1], "zero_shot"), {**want, "unlabelled": 0}, tol=1e-9)

    # the jitted embeddings are replicated on the mesh and equal the eager model's
    embed_images, embed_texts = ce.make_embedders(setup)
    rows = {k: held[k][:c.data.global_batch] for k in ("image", "tokens", "segment_ids")}
    placed = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in rows.items()}
    jit_image = embed_images(params, placed["image"])
    jit_text = embed_texts(params, placed["tokens"], placed["segment_ids"])
    assert jit_image.sharding.spec == PartitionSpec() and jit_text.sharding.spec == PartitionSpec()
    ref_image, ref_text = _eager_embeddings(setup.graphdef, params, *rows.values())
    np.testing.assert_allclose(np.asarray(jit_image), ref_image, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jit_text), ref_text, atol=1e-5)


def test_a_model_that_does_not_train_on_pairs_is_skipped_with_the_reason():
    c = small_config()
    c.eval = dict(zero_shot=True, retrieval=True)
    setup, _ = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
    logged = []
    assert make_evaluators(c, setup, default_tokenizer(c.data), logged.append) == {}
    assert sorted(line.split("'")[1] for line in logged) == ["retrieval", "zero_shot"]
    for line in logged:
        assert "skipped: model 'mm1' trains with objective 'next_token' on packed sequences" in line, line


def test_zero_shot_on_images_without_classes_is_skipped_with_the_reason():
    c = _dual_config()
    c.evaluators.zero_shot.source = "procedural"  # captions with entities but no class
    setup, _ = build_step(c, make_mesh(dict(c.mesh)), get_layout(c.rules))
    assert ce.make_zero_shot(c, setup, default_tokenizer(c.data)) == (
        f"config.evaluators.zero_shot.source='procedural' gave no image with a class label in {N_EVAL} examples")


def test_a_pair_model_without_a_text_tower_is_skipped(monkeypatch):
    monkeypatch.setitem(MODELS, "image_only", ModelSpec("image_only", build=None, inputs=("image",),
                                                        objective="contrastive"))
    c = _dual_config()
    c.model.name = "image_only"
    assert ce.embedding_model_problem(c, setup=None) == (
        "model 'image_only' as configured reads no tokens or segment_ids, so it does not embed both images and texts")


@pytest.mark.parametrize("name,setting,value,match", [
    ("zero_shot", "templates", (), "templates is empty"),
    ("zero_shot", "templates", ("a photo",), "evaluators.zero_shot.templates"),
    ("zero_shot", "templates", ("{} and {}",), "one '{}'"),
    ("zero_shot", "templates", ("{}", 3), "tuple of prompt templates"),
    ("zero_shot", "num_examples", 0, "evaluators.zero_shot.num_examples"),
    ("zero_shot", "source", "nosuchformat:x", "config.evaluators.zero_shot.source='nosuchformat:x'"),
    ("retrieval", "num_examples", 10, "an integer > 10"),
    ("retrieval", "source", "jsonl:", "config.evaluators.retrieval.source='jsonl:'"),
    ("retrieval", "topk", 5, "no setting 'topk'"),
])
def test_bad_settings_are_refused(name, setting, value, match):
    c = _dual_config()
    c.evaluators[name][setting] = value
    with pytest.raises(Refusal, match=match.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        check_config(c, 8, 1)


def test_clip_tiny_switches_the_evaluators_on():
    for loss in ("siglip", "clip"):
        c = clip_tiny_config(loss)
        check_config(c, 8, 1)
        assert c.eval.zero_shot and c.eval.retrieval and not c.eval.caption_accuracy
        assert 0 < c.train.eval_every < c.train.steps
