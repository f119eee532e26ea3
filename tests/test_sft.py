"""The supervised fine-tuning stage's pieces: the embedded procedural
conversations, generation prompts in the chat template (tokenised exactly
as the training examples), the grounding and referring tasks, and the tiny
SFT stage chained from a pre-trained workdir."""

import numpy as np
import pytest

from conftest import small_config
from mmjax.data import chat, shapes
from mmjax.data.pipeline import default_tokenizer, make_builder
from mmjax.data.procedural_sft import SOURCES, grounding_question
from mmjax.data.regions import parse_boxes
from mmjax.eval import formats
from mmjax.eval.tasks import _grounding_score, box_iou

IMAGE = 32


def _images(record) -> int:
    return sum("image" in seg for seg in record["segments"])


def test_procedural_conversations_by_stream():
    """Single-image on `caption`, 2-3 pictures on `interleaved`, none on
    `text`; every record a well-formed conversation, the same for the same index."""
    for stream, source_cls in SOURCES.items():
        source = source_cls(image_size=IMAGE, seed=0)
        for index in range(40):
            record = source[index]
            again = source[index]
            assert record["stream"] == stream
            assert [seg.get("text") for seg in record["segments"]] == [seg.get("text") for seg in again["segments"]]
            turns = chat.turns(record["segments"])
            assert turns[-1][0] == "assistant" and {role for role, _ in turns} <= {"user", "assistant"}
            n = _images(record)
            assert {"caption": n == 1, "interleaved": 2 <= n <= 3, "text": n == 0}[stream], (stream, n)


def test_grounding_answers_are_the_shapes_boxes():
    """The grounding answer read back is the drawn shape's box (within the
    0-999 quantisation), and the box holds that shape's colour."""
    rng = np.random.default_rng(0)
    asked = 0
    for _ in range(60):
        scene, boxes = shapes.sample_scene(rng), []
        image = shapes.render_scene(scene, IMAGE, rng, boxes)
        got = grounding_question(scene, boxes, IMAGE, rng)
        if got is None:
            continue
        asked += 1
        question, answer, box = got
        (parsed,) = parse_boxes(answer, IMAGE, IMAGE)
        np.testing.assert_allclose(parsed, box, atol=IMAGE / 999)
        colour, kind = question.split()[3:5]
        assert kind.rstrip("?") in shapes.KINDS
        x1, y1, x2, y2 = box
        inside = image[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        closest = np.abs(inside - np.array(shapes.COLOURS[colour])).sum(axis=1).min()
        assert closest <= 3 * 12  # a pixel of the shape's colour (with its jitter) lies in the box
    assert asked > 30


def test_a_generation_prompt_is_the_training_example_up_to_the_answer():
    """The chat-template prompt (a last user turn and the assistant's marker)
    tokenises exactly as the same conversation's training example does up to
    its answer, so a fine-tuned model is asked what it was trained on."""
    c = small_config()
    builder = make_builder(c.data, default_tokenizer(c.data))
    image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    user = [{"image": image, "role": "user"}, {"text": "how many shapes are there?", "role": "user"}]
    example = builder({"stream": "caption", "segments": user + [{"text": "two.", "role": "assistant"}]})
    prompt = builder({"stream": "caption", "segments": user, "prompt": True})
    ids = prompt["ids"][:-1]  # the closing <eos> a prompt gets, which prompts drop
    assert len(ids) < len(example["ids"]) - 1
    np.testing.assert_array_equal(ids, example["ids"][:len(ids)])
    np.testing.assert_array_equal(prompt["slots"][:-1], example["slots"][:len(ids)])
    assert not prompt["weights"].any() and example["weights"][len(ids):].all()  # the answer and its <eos>
    with pytest.raises(ValueError, match="does not end with a user turn"):
        chat.render(user + [{"text": "two.", "role": "assistant"}], prompt=True)


def test_grounding_score_counts_iou_of_half_or_more():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    item = formats.Item("a", np.zeros((IMAGE, IMAGE, 3), np.uint8), box=(0, 0, 16, 16))
    exact, shifted, none = "[0, 0, 499, 499]", "[250, 0, 749, 499]", "top left."
    scores, per_item = _grounding_score([exact, shifted, none], [item] * 3)
    assert per_item == [100.0, 0.0, 0.0] and scores["accuracy"] == pytest.approx(100 / 3)


def test_procedural_region_items():
    grounding = formats.procedural_items("grounding", "eval", 20, IMAGE, 0)
    referring = formats.procedural_items("referring", "eval", 20, IMAGE, 0)
    assert len(grounding) == len(referring) == 20
    assert all(item.box and "answer with its box" in item.question for item in grounding)
    assert all(item.question == "what is in <region>?" and len(item.box) == 4 and item.answer.startswith("a ")
               for item in referring)
    # the existing tasks' items did not move (same random stream per item)
    vqa = formats.procedural_items("vqa", "eval", 3, IMAGE, 0)
    assert [i.question for i in vqa] == [i.question for i in formats.procedural_items("vqa", "eval", 3, IMAGE, 0)]


@pytest.mark.slow  # two short training runs with generation tasks
def test_the_sft_stage_starts_from_the_pretrained_workdir(tmp_path):
    """Pre-train the small model briefly, then fine-tune it with
    `init_from` the first workdir: the stage starts from those weights (its
    first loss is the pre-trained model's on the new data, below a fresh
    model's), trains on the conversations, and reports the chat tasks."""
    from experiments.tiny import fine_tuning
    from mmjax.train.loop import train

    pre = small_config(steps=20)
    train(pre, str(tmp_path / "pt"))
    sft = small_config(steps=20)
    fine_tuning(sft)
    sft.train.steps = 20
    sft.optimizer.warmup_steps = 2
    for name in ("shapes_vqa", "shapes_grounding", "shapes_referring"):
        sft.evaluators[name].num_examples = 8
    fresh = train(sft, str(tmp_path / "fresh"))
    sft.init_from = (str(tmp_path / "pt"),)
    summary = train(sft, str(tmp_path / "sft"))
    assert summary["loss_first10_mean"] < fresh["loss_first10_mean"]
    for key in ("shapes_vqa/accuracy@0shot", "shapes_grounding/accuracy@0shot", "shapes_referring/accuracy@0shot"):
        assert key in summary["eval"]["initial"] and key in summary["eval"]["final"]


def test_a_referring_prompt_carries_its_region_token():
    """In the chat template with region tokens on, a referring prompt writes
    the region's box as text and puts a region token after it, pointing at
    the prompt's image, with the region's coverage; a batch of such prompts
    carries the region fields padded per row."""
    from mmjax.data.examples import ExampleBuilder
    from mmjax.eval.batching import pad_batch
    from mmjax.eval.prompts import PromptMaker, Template

    c = small_config()
    tok = default_tokenizer(c.data)
    builder = ExampleBuilder(tok, 10**6, 10**6, c.data.tokens_per_image, c.data.image_size, max_regions=10**6,
                             region_grid=8)
    items = formats.procedural_items("referring", "eval", 3, c.data.image_size, 0)
    template = Template("<image> {question}", "{answer}", "", "", chat=True)
    one_shot = PromptMaker(builder, template, items, 1, 4096, 8, 0, "test").make(0, items[0])
    (at,) = np.nonzero(one_shot.regions["region_slots"] >= 0)[0][-1:]  # the query's region
    assert one_shot.ids[at] == tok.image_id and one_shot.regions["region_images"].tolist() == [0, 1]
    box_text = tok.decode(one_shot.ids[max(0, at - 24):at].tolist())
    assert parse_boxes(box_text), box_text
    assert one_shot.regions["region_masks"][-1].sum() > 0
    zero_shot = PromptMaker(builder, template, items, 0, 4096, 8, 0, "test").make(1, items[1])
    batch = pad_batch([one_shot, zero_shot], 2, (c.data.image_size,) * 2 + (3,))
    assert batch["region_images"].tolist() == [[0, 1], [0, -1]] and batch["region_masks"].shape == (2, 2, 8, 8)
    assert (batch["region_slots"] >= 0).sum(axis=1).tolist() == [2, 1]
