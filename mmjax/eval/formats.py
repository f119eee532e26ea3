"""Evaluation items read from the formats the public datasets ship in.

Every reader returns `(items, skipped)`: a list of `Item` and a count of the
entries it could not use (named in a warning). A path that matches nothing
or a file that is not what its format promises is refused with one sentence
(`DataError`) naming the task's setting and the file.

  coco        captioning: COCO-captions JSON (`images` [{id, file_name}] +
              `annotations` [{image_id, caption}]) and an image folder; COCO,
              NoCaps and TextCaps ship in this shape
  vqav2       VQA: a questions JSON (`questions` [{question_id, image_id,
              question}]) + an annotations JSON (`annotations` [{question_id,
              answers: [{answer}]}]) and an image folder, images named by
              `image_pattern` (e.g. "COCO_val2014_{image_id:012d}.jpg"); TextVQA,
              VizWiz and OK-VQA can be given in this shape
  jsonl       multiple choice: one `{"context", "choices", "gold"}` object per
              line (HellaSwag, ARC, PIQA after conversion)
  procedural  held-out scenes of the embedded shapes data (captions and
              questions about colour, kind, place and count); no files
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from mmjax.data import shapes
from mmjax.data.procedural import SPLITS
from mmjax.data.records import warn_bad_input
from mmjax.errors import DataError
from mmjax.eval.vqa_accuracy import normalize_answer


@dataclasses.dataclass(frozen=True)
class Item:
    """One thing to score. `image`: uint8 `[h, w, 3]`, a file path, or None.
    `references`: captions, or the human answers of a VQA question;
    `answer`: the text shown when the item is a demonstration (default: the
    first reference)."""

    id: str
    image: Any = None
    question: str = ""
    references: tuple[str, ...] = ()
    context: str = ""
    choices: tuple[str, ...] = ()
    gold: int = -1
    answer: str = ""
    box: tuple = ()  # pixel box `(x1, y1, x2, y2)`: the answer (grounding) or the `<region>` (referring)

    def shown_answer(self) -> str:
        return self.answer or (self.references[0] if self.references else "")


def expand(where: str, pattern: str) -> list[str]:
    """Files matching `pattern` (a path or a glob), sorted; one sentence naming
    `where` (the setting) when nothing matches."""
    if not pattern:
        raise DataError(f"{where} is empty; give a file path.")
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matches:
        raise DataError(f"{where}={pattern!r} matches no file.")
    return matches


def _load_json(where: str, path: str, keys: tuple[str, ...]) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: {path} is not readable JSON ({err}).") from None
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{where}: {path} has no {missing[0]!r} list; expected the "
                        f"{'/'.join(keys)} layout of the public release.")
    return data


def _field(where: str, path: str, entry: dict, key: str, kind: type):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {path} has an entry without a valid {key!r}: {str(entry)[:120]}.")
    return value


def read_coco_captions(where: str, annotations: str, images: str) -> tuple[list[Item], int]:
    """One item per image with all its captions as references."""
    items, skipped = [], 0
    for path in expand(f"{where}.annotations", annotations):
        data = _load_json(f"{where}.annotations", path, ("images", "annotations"))
        captions: dict[Any, list[str]] = {}
        for entry in data["annotations"]:
            image_id = _field(f"{where}.annotations", path, entry, "image_id", (int, str))
            captions.setdefault(image_id, []).append(_field(f"{where}.annotations", path, entry, "caption", str))
        for entry in data["images"]:
            image_id = _field(f"{where}.annotations", path, entry, "id", (int, str))
            name = _field(f"{where}.annotations", path, entry, "file_name", str)
            if not captions.get(image_id):
                skipped += 1
                warn_bad_input(f"{where}: image {image_id} of {path}", "it has no caption")
                continue
            items.append(Item(str(image_id), os.path.join(images, name), references=tuple(captions[image_id])))
    return items, skipped


def read_vqa(where: str, questions: str, annotations: str, images: str, image_pattern: str
             ) -> tuple[list[Item], int]:
    """One item per question that has annotated answers."""
    answers: dict[Any, tuple[str, ...]] = {}
    canonical: dict[Any, str] = {}
    for path in expand(f"{where}.annotations", annotations):
        for entry in _load_json(f"{where}.annotations", path, ("annotations",))["annotations"]:
            qid = _field(f"{where}.annotations", path, entry, "question_id", (int, str))
            given = _field(f"{where}.annotations", path, entry, "answers", list)
            answers[qid] = tuple(str(a.get("answer", "")) if isinstance(a, dict) else str(a) for a in given)
            given_answers = list(answers[qid])
            canonical[qid] = str(entry.get("multiple_choice_answer") or
                                 (max(set(given_answers), key=given_answers.count) if given_answers else ""))
    items, skipped = [], 0
    for path in expand(f"{where}.questions", questions):
        for entry in _load_json(f"{where}.questions", path, ("questions",))["questions"]:
            qid = _field(f"{where}.questions", path, entry, "question_id", (int, str))
            question = _field(f"{where}.questions", path, entry, "question", str)
            if not answers.get(qid):
                skipped += 1
                warn_bad_input(f"{where}: question {qid} of {path}", "it has no annotated answers")
                continue
            image_id = _field(f"{where}.questions", path, entry, "image_id", (int, str))
            name = entry.get("image") or entry.get("file_name") or _image_name(where, image_pattern, image_id)
            items.append(Item(str(qid), os.path.join(images, name), question=question, references=answers[qid],
                              answer=canonical[qid]))
    return items, skipped


def _image_name(where: str, pattern: str, image_id) -> str:
    try:
        return pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"{where}.image_pattern={pattern!r} cannot name image {image_id!r} ({err}); "
                        "use a pattern such as 'COCO_val2014_{{image_id:012d}}.jpg'.") from None


def read_multiple_choice(where: str, path_pattern: str) -> tuple[list[Item], int]:
    """One item per JSONL line with a context, at least two choices and a
    valid gold index; other lines are skipped and counted."""
    items, skipped = [], 0
    for path in expand(f"{where}.path", path_pattern):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    context, choices, gold = entry["context"], entry["choices"], entry["gold"]
                    ok = (isinstance(context, str) and isinstance(choices, list) and len(choices) >= 2
                          and all(isinstance(c, str) for c in choices) and isinstance(gold, int)
                          and 0 <= gold < len(choices))
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    skipped += 1
                    warn_bad_input(f"{where}: {path}:{number}", 'not a {"context", "choices", "gold"} object')
                    continue
                items.append(Item(str(entry.get("id", f"{os.path.basename(path)}:{number}")), context=context,
                                  choices=tuple(choices), gold=gold))
    if not items:
        raise DataError(f"{where}.path={path_pattern!r}: no usable multiple-choice line.")
    return items, skipped


# Procedural questions about one scene: (question, answer) templates.
def _scene_questions(scene: list[shapes.Shape], rng: np.random.Generator) -> tuple[str, str]:
    s = scene[rng.integers(len(scene))]
    options = [
        ("how many shapes are there?", shapes.COUNT_WORDS[len(scene)]),
        (f"what colour is the shape at the {s.position}?", s.colour),
        (f"what is at the {s.position}?", f"a {s.colour} {s.kind}"),
        (f"where is the {s.colour} {s.kind}?", s.position),
    ]
    return options[rng.integers(len(options))]


def procedural_items(kind: str, split: str, count: int, image_size: int, seed: int) -> list[Item]:
    """`count` held-out scenes of split `split` ("eval" queries, "support"
    demonstrations): captions (`kind="caption"`), one question each
    (`kind="vqa"`, ten identical human answers, as VQA files carry), or the
    fine-tuning data's grounding / referring questions
    (`mmjax.data.procedural_sft`: `kind="grounding"` with the shape's `box`,
    scenes whose shapes all repeat skipped; `kind="referring"`)."""
    from mmjax.data.procedural_sft import grounding_question, referring_question

    items, index = [], 0
    salt = {"caption": 7, "vqa": 8, "grounding": 9, "referring": 10}[kind]
    while len(items) < count:
        rng = np.random.default_rng([seed, SPLITS[split], salt, index])
        scene, boxes = shapes.sample_scene(rng), []
        image = shapes.render_scene(scene, image_size, rng, boxes)
        item_id, index = f"{split}-{index}", index + 1
        if kind == "caption":
            items.append(Item(item_id, image, references=(shapes.caption(scene),)))
        elif kind == "grounding":
            asked = grounding_question(scene, boxes, image_size, rng)
            if asked is not None:
                items.append(Item(item_id, image, question=asked[0], references=(asked[1],), box=asked[2]))
        else:
            box = ()
            if kind == "referring":
                question, answer, box = referring_question(scene, boxes, rng)
            else:
                question, answer = _scene_questions(scene, rng)
            answer = answer.rstrip(".")  # references normalised, as VQA releases are
            items.append(Item(item_id, image, question=question,
                              references=(normalize_answer(answer),) * 10, answer=answer, box=box))
    return items
