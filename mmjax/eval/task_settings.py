"""Settings blocks of the generation tasks, for experiment configs
(`config.evaluators.<name> = caption_task(...)`); see `mmjax.eval.tasks`
for what each field means. Importing this module loads nothing heavy."""

from __future__ import annotations


def caption_task(**overrides) -> dict:
    """Settings of a captioning task (MM1's layout: `<image>` then the caption)."""
    return dict(dict(kind="caption", format="coco", shots=(0, 4, 8), num_examples=0, support_examples=64,
                     max_new_tokens=32, max_len=0, batch_size=0, query="<image>", answer=" {answer}",
                     separator="\n", prefix="", stop=("\n",), blank_images=False, chat=False, seed=0,
                     images="", annotations="", support_images="", support_annotations=""), **overrides)


def vqa_task(**overrides) -> dict:
    """Settings of a VQA task (MM1's layout: `<image> Question: … Answer: …`)."""
    return dict(dict(kind="vqa", format="vqav2", shots=(0, 4, 8), num_examples=0, support_examples=64,
                     max_new_tokens=16, max_len=0, batch_size=0, query="<image> Question: {question} Answer:",
                     answer=" {answer}", separator="\n", prefix="", stop=("\n",), blank_images=False,
                     chat=False, seed=0, images="", annotations="", questions="", image_pattern="COCO_val2014_{image_id:012d}.jpg",
                     support_images="", support_annotations="", support_questions=""), **overrides)


def choice_task(**overrides) -> dict:
    """Settings of a multiple-choice text task (see `mmjax.eval.choice`)."""
    return dict(dict(kind="multiple_choice", format="jsonl", path="", support_path="", shots=(0, 1),
                     num_examples=0, separator="\n\n", batch_size=0, max_len=0, seed=0), **overrides)


def shapes_tasks(shots=(0, 4), num_examples: int = 64) -> dict:
    """Procedural captioning and VQA on held-out scenes of the embedded shapes
    data, in the layouts of its interleaved documents (albums of captioned
    pictures; "a page of pictures with questions. picture 1: <image>
    question: … answer: red.")."""
    caption = caption_task(format="procedural", shots=tuple(shots), num_examples=num_examples, separator="",
                           stop=(), max_new_tokens=32, blank_images=True)
    vqa = vqa_task(format="procedural", shots=tuple(shots), num_examples=num_examples, separator="",
                   prefix="a page of pictures with questions.",
                   query=" picture {number}: <image> question: {question} answer:", answer=" {answer}.",
                   stop=(".",), max_new_tokens=8, blank_images=True)
    return {"shapes_caption": caption, "shapes_vqa": vqa}


def region_task(kind: str, **overrides) -> dict:
    """Settings of a procedural grounding or referring task (`kind`), asked
    in the chat template (the fine-tuning data's phrasing)."""
    return dict(dict(kind=kind, format="procedural", shots=(0,), num_examples=64, support_examples=64,
                     max_new_tokens=24 if kind == "grounding" else 8, max_len=0, batch_size=0,
                     query="<image> {question}", answer="{answer}", separator="", prefix="", stop=(),
                     blank_images=False, chat=True, seed=0, images="", annotations="", support_images="",
                     support_annotations=""), **overrides)


def shapes_chat_tasks(num_examples: int = 64) -> dict:
    """The fine-tuned model's procedural tasks, each prompt a conversation in
    the chat template: VQA (0-shot: one user turn with the picture and the
    question), grounding and referring."""
    vqa = vqa_task(format="procedural", shots=(0,), num_examples=num_examples, separator="", prefix="",
                   query="<image> {question}", answer="{answer}.", stop=(".",), max_new_tokens=8, chat=True)
    return {"shapes_vqa": vqa, "shapes_grounding": region_task("grounding", num_examples=num_examples),
            "shapes_referring": region_task("referring", num_examples=num_examples)}
