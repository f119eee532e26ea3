"""Generation tasks scored as the MM1 paper scores a pre-trained model:
captioning (CIDEr-D, BLEU-4) and VQA (VQA accuracy), 0/k-shot.

Registered evaluator kinds (settings in `config.evaluators.<name>`, with
`kind` naming the kind; see `mmjax.train.evaluators`):
  caption  format "procedural" | "coco" (annotations, images)
  vqa      format "procedural" | "vqav2" (questions, annotations, images,
           image_pattern)
  grounding  format "procedural": "where is the red circle? answer with its
           box." on held-out scenes; accuracy = the share of answers whose
           first box (`[x1, y1, x2, y2]` in 0-999, `mmjax.data.regions`) has
           IoU >= 0.5 with the shape's box
  referring  format "procedural": "what is in [x1, y1, x2, y2]?"; VQA accuracy
           of the answer ("a red circle")
All take `shots` (e.g. (0, 4)), `num_examples` (0: all), demonstrations
from `support_*` files (empty: the evaluated set itself, never the query),
the prompt `query`/`answer`/`separator`/`prefix` (mmjax.eval.prompts),
`chat` (the prompt in the training chat template, for fine-tuned models),
`stop` strings, `max_new_tokens`, `max_len` (0: data.seq_len),
`batch_size` (0: data.global_batch), `blank_images` (also score with every
image replaced by mid-grey: what the text alone gives) and `seed`.

Metrics, per number of shots k: `cider@{k}shot`, `bleu4@{k}shot` (x100, the
papers' scale) or `accuracy@{k}shot` (%), `scored@{k}shot`,
`dropped_shots@{k}shot` (demonstrations dropped to fit `max_len`), and
`skipped` (items whose image or prompt was unusable, named in warnings);
with `blank_images` the scores again under `blank_images/`. After a call,
`evaluate.predictions` holds one row per scored prompt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
from flax import nnx

from mmjax.data.examples import ExampleBuilder
from mmjax.errors import ConfigError, DataError
from mmjax.eval import formats
from mmjax.eval.batching import Generator
from mmjax.eval.caption_scores import bleu, cider_d, tokenize_caption
from mmjax.eval.prompts import Prompt, PromptMaker, Template
from mmjax.eval.vqa_accuracy import vqa_accuracy
from mmjax.generate.decode import Sampling
from mmjax.models import model_spec
from mmjax.train.config_schema import boolean, integer, one_of, sequence_of, text
from mmjax.train.evaluators import register_evaluator

_COMMON = {
    "format": text,
    "shots": sequence_of(None, integer(0), "a tuple of non-negative shot counts, e.g. (0, 4)"),
    "num_examples": integer(0),
    "support_examples": integer(1),
    "max_new_tokens": integer(1),
    "max_len": integer(0),
    "batch_size": integer(0),
    "query": text,
    "answer": text,
    "separator": text,
    "prefix": text,
    "stop": sequence_of(None, text, "a tuple of stop strings, e.g. ('\\n',)"),
    "blank_images": boolean,
    "chat": boolean,
    "seed": integer(0),
    "images": text,
    "annotations": text,
    "support_images": text,
    "support_annotations": text,
}
CAPTION_FIELDS = dict(_COMMON, format=one_of(lambda: ("procedural", "coco")))
VQA_FIELDS = dict(_COMMON, format=one_of(lambda: ("procedural", "vqav2")), questions=text,
                  support_questions=text, image_pattern=text)
REGION_FIELDS = dict(_COMMON, format=one_of(lambda: ("procedural",)))
IOU_THRESHOLD = 0.5  # a grounding answer counts when its box overlaps the truth this much
BIG = 10**9  # no truncation by the example builder: prompts are fitted here


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How a task reads items and scores predictions."""

    read: Callable  # (where, settings, split: "query" | "support", config) -> (items, skipped)
    score: Callable  # (predictions: list[str], items) -> ({metric: value}, per-item scores)


# The files each format reads, first the one whose `support_` twin switches a support set on.
FILES = {"coco": ("annotations",), "vqav2": ("questions", "annotations")}
READERS = {
    "coco": lambda where, s, p: formats.read_coco_captions(where, s[p + "annotations"], s[p + "images"]),
    "vqav2": lambda where, s, p: formats.read_vqa(where, s[p + "questions"], s[p + "annotations"],
                                                  s[p + "images"], s.image_pattern),
}


def _reader(kind: str) -> Callable:
    """(where, settings, split, config) -> (items, skipped); (None, 0) for a
    support split without its own files (the evaluated set serves)."""

    def read(where, s, split, config):
        if s.format == "procedural":
            count = (s.num_examples or 64) if split == "query" else s.support_examples
            return formats.procedural_items(kind, "eval" if split == "query" else "support", count,
                                            config.data.image_size, s.seed), 0
        prefix = "support_" if split == "support" else ""
        if split == "support" and not s[prefix + FILES[s.format][0]]:
            return None, 0
        return READERS[s.format](where, s, prefix)

    return read


def _caption_score(predictions, items):
    ids = [str(i) for i in range(len(items))]
    preds = {i: tokenize_caption(p) for i, p in zip(ids, predictions)}
    refs = {i: [tokenize_caption(r) for r in item.references] for i, item in zip(ids, items)}
    cider, per_item = cider_d(preds, refs)
    bleus, _ = bleu(preds, refs, 4)
    return {"cider": 100.0 * cider, "bleu4": 100.0 * bleus[3]}, [100.0 * float(per_item[i]) for i in ids]


def _vqa_score(predictions, items):
    per_item = [100.0 * vqa_accuracy(p, list(item.references)) for p, item in zip(predictions, items)]
    return {"accuracy": float(np.mean(per_item))}, per_item


def box_iou(a, b) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _grounding_score(predictions, items):
    """Accuracy (%): the first box in the prediction (`regions.parse_boxes`,
    in the image's pixels) overlaps the item's box with IoU >= IOU_THRESHOLD;
    a prediction without a box scores 0."""
    from mmjax.data.regions import parse_boxes

    per_item = []
    for text_out, item in zip(predictions, items):
        height, width = np.asarray(item.image).shape[:2]
        boxes = parse_boxes(text_out, width, height)
        per_item.append(100.0 * float(bool(boxes) and box_iou(boxes[0], item.box) >= IOU_THRESHOLD))
    return {"accuracy": float(np.mean(per_item))}, per_item


SCORINGS = {"caption": Scoring(_reader("caption"), _caption_score), "vqa": Scoring(_reader("vqa"), _vqa_score),
            "grounding": Scoring(_reader("grounding"), _grounding_score),
            "referring": Scoring(_reader("referring"), _vqa_score)}


def stop_token_ids(tokenizer, stops) -> tuple[int, ...]:
    """Ids of the tokens whose text contains a stop string: a row stops on
    the device when it emits one (a stop string spread over several tokens
    is still cut from the text afterwards, `cut_at_stop`)."""
    stops = [s for s in stops if s]
    if not stops:
        return ()
    return tuple(i for i in range(tokenizer.vocab_size)
                 if any(s in tokenizer.decode([i]) for s in stops) and i != tokenizer.eos_id)


def cut_at_stop(text_out: str, stops) -> str:
    """`text_out` up to the first stop string, stripped."""
    for stop in stops:
        if stop and stop in text_out:
            text_out = text_out[:text_out.index(stop)]
    return text_out.strip()


class GenerationTask:
    """evaluate(params) -> metrics, see the module doc."""

    def __init__(self, config, setup, tokenizer, name: str, kind: str):
        self.name, self.kind, self.tokenizer = name, kind, tokenizer
        s = self.settings = config.evaluators[name]
        where = f"config.evaluators.{name}"
        scoring = self.scoring = SCORINGS[kind]
        self.items, skipped_query = scoring.read(where, s, "query", config)
        if s.num_examples:
            self.items = self.items[:s.num_examples]
        support, skipped_support = scoring.read(where, s, "support", config)
        self.support = self.items if support is None else support
        self.skipped_files = skipped_query
        available = len(self.support) - (1 if support is None else 0)
        if max(s.shots) > available:
            raise ConfigError(f"{where}.shots={tuple(s.shots)} asks for {max(s.shots)} demonstrations but the "
                              f"support set holds {available}" + (" (the evaluated set less the query)"
                                                                  if support is None else "") + ".")
        d = config.data
        uses_images = model_spec(config.model).uses_images
        from mmjax.models.mm1 import regions_enabled

        self.builder = ExampleBuilder(tokenizer, BIG, BIG, d.tokens_per_image, d.image_size,
                                      image_split=tuple(d.image_split), tile_separators=d.tile_separators,
                                      max_regions=BIG if regions_enabled(config.model) else 0,
                                      region_grid=d.get("region_grid", 0))
        self.template = Template(s.query, s.answer, s.separator, s.prefix, bool(s.get("chat", False)))
        self.max_len = s.max_len or d.seq_len
        self.where = where
        sampling = Sampling(max_new_tokens=s.max_new_tokens, pad_id=tokenizer.pad_id,
                            stop_ids=(tokenizer.eos_id,) + stop_token_ids(tokenizer, s.stop))
        batch_spec = setup.batch_shardings["tokens"].spec[0]
        model = nnx.merge(setup.graphdef, setup.abstract_params)
        self.generator = Generator(model, sampling, setup.mesh, setup.resolver, batch_spec,
                                   s.batch_size or d.global_batch,
                                   (d.image_size, d.image_size, 3) if uses_images else None)
        self.predictions: list[dict] = []
        self.progress_factory = None  # (total, description) -> object with update(n) and close()

    def prompts(self, shots: int) -> tuple[list[Prompt], list[formats.Item], int]:
        """(prompts, their items, skipped) for `shots` demonstrations each."""
        s = self.settings
        maker = PromptMaker(self.builder, self.template, self.support, shots, self.max_len, s.max_new_tokens,
                            s.seed, self.where)
        prompts, items, skipped = [], [], 0
        for index, item in enumerate(self.items):
            prompt = maker.make(index, item)
            if prompt is None:
                skipped += 1
            else:
                prompts.append(prompt)
                items.append(item)
        return prompts, items, skipped

    def _run(self, params, prompts: list[Prompt], description: str) -> list[str]:
        bar = self.progress_factory(len(prompts), description) if self.progress_factory else None
        outputs = self.generator(params, prompts, bar.update if bar else (lambda n: None))
        if bar:
            bar.close()
        # A stop token's own text before the stop string is kept: decode it too, then cut.
        return [cut_at_stop(self.tokenizer.decode(ids + ([stop] if stopped and stop != self.tokenizer.eos_id
                                                          else [])), self.settings.stop)
                for ids, stopped, stop in outputs]

    def __call__(self, params) -> dict:
        s, metrics, self.predictions = self.settings, {}, []
        skipped = self.skipped_files
        variants = [False] + ([True] if s.blank_images else [])
        for shots in s.shots:
            prompts, items, skipped_now = self.prompts(shots)
            skipped = max(skipped, self.skipped_files + skipped_now)
            if not prompts:
                continue
            for blank in variants:
                shown = [dataclasses.replace(p, images=np.full_like(p.images, 128)) for p in prompts] \
                    if blank else prompts
                tag = ("blank_images/" if blank else "") + f"{{}}@{shots}shot"
                texts = self._run(params, shown, f"{self.name} {shots}-shot" + (" blank" if blank else ""))
                scores, per_item = self.scoring.score(texts, items)
                metrics.update({tag.format(k): v for k, v in scores.items()})
                if not blank:  # the same prompts either way
                    metrics[tag.format("scored")] = len(prompts)
                    metrics[tag.format("dropped_shots")] = int(sum(p.dropped_shots for p in prompts))
                self.predictions += [{"id": item.id, "shots": shots, "shots_used": p.shots,
                                      "blank_images": blank, "question": item.question, "prediction": t,
                                      "references": list(item.references), "score": sc}
                                     for item, p, t, sc in zip(items, prompts, texts, per_item)]
        metrics["skipped"] = skipped
        return metrics


def _make(kind: str):
    def make(config, setup, tokenizer, name: str):
        if not model_spec(config.model).uses_images \
                and "<image>" in config.evaluators[name].query:
            return f"model {config.model.get('name', 'mm1')!r} reads no images"
        return GenerationTask(config, setup, tokenizer, name, kind)
    return make


def check_shots(settings, where: str) -> None:
    if not tuple(settings.shots):
        raise ConfigError(f"{where}.shots is empty; give at least one shot count, e.g. (0,).")


def check_files(settings, where: str) -> None:
    """The task's files exist (globs match) and `shots` is not empty."""
    check_shots(settings, where)
    for key in FILES.get(settings.format, ()):
        formats.expand(f"{where}.{key}", settings[key])
        if settings.get("support_" + key):
            formats.expand(f"{where}.support_{key}", settings["support_" + key])
    if settings.format != "procedural" and not os.path.isdir(os.path.expanduser(settings.images)):
        raise DataError(f"{where}.images={settings.images!r} is not a folder.")


register_evaluator("caption", fields=CAPTION_FIELDS, check=check_files)(_make("caption"))
register_evaluator("vqa", fields=VQA_FIELDS, check=check_files)(_make("vqa"))
register_evaluator("grounding", fields=REGION_FIELDS, check=check_shots)(_make("grounding"))
register_evaluator("referring", fields=REGION_FIELDS, check=check_shots)(_make("referring"))
