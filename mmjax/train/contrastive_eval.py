"""Zero-shot classification and image<->text retrieval of a dual encoder
(CLIP / SigLIP): evaluators `zero_shot` and `retrieval`.

Both read held-out pairs (split "eval", `mmjax.data.pairs` on the run's data
config with the evaluator's `source`), embed them with the model's
`embed_images` (`[b, T, T, 3]` -> `[b, d]`) and `embed_texts` (`[b, L]` ->
`[b, d]`, unit norm), jitted on the run's mesh in batches of
`data.global_batch`, and rank candidates by cosine similarity. They run on
a model whose objective (`mmjax.train.objectives`) trains on image-text
pairs and that has both methods; any other model is skipped with the reason.

Ranks count ties against the query: the right answer's rank is the number
of other candidates scoring at least as high as it, so a hit at K
(rank < K) does not depend on the candidates' order.

zero_shot (settings `source`, `num_examples`, `templates`): every class of
`label_set(config.data).classes` is written into every template (`{}` ->
the class name); a class's embedding is the mean of its unit template
embeddings, renormalised (CLIP's prompt ensembling). Each of
`num_examples` images of `source` with a class label (`class_id >= 0`) is
given the most similar class. Metrics: top1_accuracy, top5_accuracy (with
more than 5 classes), chance (1 / classes), examples (images scored),
unlabelled (images read without a class, not scored).

retrieval (settings `source` ("": `data.sources.caption`), `num_examples`):
`num_examples` pairs; each image queries all the texts and each text all
the images. Metrics image_to_text/recall@K and text_to_image/recall@K for
K = 1, 5, 10: the share of queries whose own pair ranks in the top K (the
standard definition: only the paired index is a hit). Captions can repeat
(a one-shape procedural caption is one of 96), and a repeat of the query's
caption embeds exactly like it, so it ties with the pair and, ties counting
against, costs the pair a place; the set's share of such pairs is reported
(duplicate_captions), and caption_recall@K also counts as a hit any
candidate whose caption is the query's (for image->text a text with the
same tokens, for text->image an image paired with the same tokens).
Also: chance@K = K / pairs, pairs.

Held out: the procedural sources (and TFDS) have an "eval" split of their
own; a file source (WebDataset, JSONL, ...) reads the same files for every
split, so give such a run a `source` of held-out files.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.data.labels import label_set
from mmjax.data.pairs import make_pair_dataset
from mmjax.data.pipeline import to_global_arrays
from mmjax.data.sources import weighted_parts
from mmjax.errors import ConfigError
from mmjax.models import model_spec
from mmjax.models.partitioning import activation_sharding
from mmjax.models.precision import cast_weights_once
from mmjax.train.config_schema import integer, sequence_of, text
from mmjax.train.evaluators import register_evaluator
from mmjax.train.objectives import model_objective
from mmjax.train.state import TrainSetup

RECALL_AT = (1, 5, 10)
SPLIT = "eval"


def _template(x) -> str | None:
    ok = isinstance(x, str) and x.count("{}") == 1 and "{" not in x.replace("{}", "") \
        and "}" not in x.replace("{}", "")
    return None if ok else "a string with one '{}' for the class name and no other braces"


ZERO_SHOT_FIELDS = {
    "source": text,
    "num_examples": integer(1),
    "templates": sequence_of(None, _template, "a non-empty tuple of prompt templates, each a string with "
                             "one '{}' for the class name, e.g. ('a photo of a {}.',)"),
}
RETRIEVAL_FIELDS = {
    "source": text,
    "num_examples": integer(max(RECALL_AT) + 1, what=f"an integer > {max(RECALL_AT)} (recall@{max(RECALL_AT)} "
                            "needs more candidates than that)"),
}


# ---------------------------------------------------------------- ranking


def answer_ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """scores `[q, c]`, correct `[q, c]` bool (each query's right candidates)
    -> `[q]` int: how many wrong candidates score at least as high as the
    best right one (ties count against the query); `c` when the query has no
    right candidate or its best right score is not finite."""
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    ranks = ((scores >= best) & ~correct).sum(axis=1)
    return np.where(np.isfinite(best[:, 0]), ranks, scores.shape[1])


def recall_at(ranks: np.ndarray, k: int) -> float:
    """The share of queries whose right answer is in the top `k` (rank < k)."""
    return float(np.mean(np.asarray(ranks) < k))


def same_caption(tokens: np.ndarray) -> np.ndarray:
    """tokens `[n, L]` -> `[n, n]` bool: rows i, j hold the same token sequence."""
    _, group = np.unique(tokens, axis=0, return_inverse=True)
    group = group.reshape(-1)
    return group[:, None] == group[None, :]


def retrieval_metrics(image: np.ndarray, text: np.ndarray, tokens: np.ndarray) -> dict:
    """image, text `[n, d]` unit embeddings of n pairs (row i of each is pair
    i), tokens `[n, L]` the texts -> the retrieval metrics of the module doc."""
    n = image.shape[0]
    scores = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T  # [n images, n texts]
    own, caption = np.eye(n, dtype=bool), same_caption(tokens)
    out = {}
    for direction, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        pair_ranks, caption_ranks = answer_ranks(s, own), answer_ranks(s, caption)
        for k in RECALL_AT:
            out[f"{direction}/recall@{k}"] = recall_at(pair_ranks, k)
            out[f"{direction}/caption_recall@{k}"] = recall_at(caption_ranks, k)
    out.update({f"chance@{k}": min(k / n, 1.0) for k in RECALL_AT})
    out.update(duplicate_captions=float(np.mean(caption.sum(axis=1) > 1)), pairs=n)
    return out


def class_embeddings(prompt_embeddings: np.ndarray, num_classes: int) -> np.ndarray:
    """Unit embeddings `[classes * templates, d]` (class-major) -> `[classes, d]`:
    each class's mean over its templates, renormalised."""
    mean = np.asarray(prompt_embeddings, np.float64).reshape(num_classes, -1, prompt_embeddings.shape[-1]).mean(1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def zero_shot_metrics(image: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict:
    """image `[n, d]`, classes `[C, d]` unit embeddings, labels `[n]` in 0..C-1
    -> top1_accuracy (top5_accuracy when C > 5), chance, examples."""
    num_classes = classes.shape[0]
    scores = np.asarray(image, np.float64) @ np.asarray(classes, np.float64).T
    ranks = answer_ranks(scores, np.asarray(labels)[:, None] == np.arange(num_classes)[None, :])
    out = {"top1_accuracy": recall_at(ranks, 1)}
    if num_classes > 5:
        out["top5_accuracy"] = recall_at(ranks, 5)
    out.update(chance=1.0 / num_classes, examples=int(len(labels)))
    return out


# ---------------------------------------------------------------- model and data


def embedding_model_problem(config, setup: TrainSetup) -> str | None:
    """Why the run's model cannot be scored by its embeddings, or None: its
    objective does not train on image-text pairs, it reads no image or no
    text (`ModelSpec.inputs_for`), or it lacks `embed_images` / `embed_texts`."""
    name = config.model.get("name", "mm1")
    spec = model_spec(config.model)
    if model_objective(config.model).data != "pairs":
        return (f"model {name!r} trains with objective {spec.objective!r} on packed sequences, not on "
                "image-text pairs: it has no image and text embeddings to compare")
    unread = [f for f in ("image", "tokens", "segment_ids") if f not in spec.inputs_for(config.model)]
    if unread:
        return (f"model {name!r} as configured reads no {' or '.join(unread)}, so it does not embed both images "
                "and texts")
    model = nnx.merge(setup.graphdef, setup.abstract_params)
    missing = [m for m in ("embed_images", "embed_texts") if not callable(getattr(model, m, None))]
    if missing:
        return f"model {name!r} has no {' or '.join(missing)}"
    return None


def make_embedders(setup: TrainSetup) -> tuple[Callable, Callable]:
    """Jitted (images(params, image `[b, T, T, 3]`), texts(params, tokens,
    segment_ids `[b, L]`)) -> unit embeddings `[b, d]`, replicated on the
    mesh so every process reads all rows."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())

    def model_of(params):
        model = nnx.merge(setup.graphdef, params)
        cast_weights_once(model)
        return model

    def images(params, image):
        with activation_sharding(setup.resolver):
            return model_of(params).embed_images(image)

    def texts(params, tokens, segment_ids):
        with activation_sharding(setup.resolver):
            return model_of(params).embed_texts(tokens, segment_ids > 0)

    return jax.jit(images, out_shardings=replicated), jax.jit(texts, out_shardings=replicated)


def _eval_data_config(config, source: str):
    """The run's data config reading `source` (the caption stream) in this process."""
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.sources.caption = source
        data.workers = 0  # a few batches, read once: no worker processes
    return data


def read_eval_pairs(config, tokenizer, setup: TrainSetup, data_cfg, num_examples: int,
                    host_fields: tuple[str, ...]) -> tuple[list[dict], dict]:
    """The first `num_examples` pairs of split "eval": (batches of
    `data.global_batch` global arrays `image`, `tokens`, `segment_ids`; the
    `host_fields` of the first `num_examples` rows, gathered from every
    process, as numpy `[num_examples, ...]`)."""
    pc, pi = jax.process_count(), jax.process_index()
    global_batch = config.data.global_batch
    ds = make_pair_dataset(data_cfg, tokenizer, batch_size=global_batch // pc, split=SPLIT,
                           process_index=pi, process_count=pc)
    rows = setup.batch_shardings["tokens"]
    row_sharding = NamedSharding(rows.mesh, PartitionSpec(rows.spec[0]))
    shardings = {k: setup.batch_shardings[k] for k in ("image", "tokens", "segment_ids")}
    shardings.update({k: row_sharding for k in host_fields if k not in shardings})
    gather = jax.jit(lambda x: x, out_shardings=NamedSharding(rows.mesh, PartitionSpec()))
    iterator, batches, host = iter(ds), [], {k: [] for k in host_fields}
    for _ in range(math.ceil(num_examples / global_batch)):
        local = next(iterator)
        batch = to_global_arrays({k: local[k] for k in shardings}, shardings)
        batches.append({k: batch[k] for k in ("image", "tokens", "segment_ids")})
        for k in host_fields:
            host[k].append(np.asarray(jax.device_get(gather(batch[k]))))
    return batches, {k: np.concatenate(v)[:num_examples] for k, v in host.items()}


def embed_batches(embed: Callable, params, batches: list[dict], fields: tuple[str, ...], n: int) -> np.ndarray:
    """`embed(params, *batch[fields])` over the batches -> the first `n` rows `[n, d]`."""
    out = [np.asarray(jax.device_get(embed(params, *(b[f] for f in fields)))) for b in batches]
    return np.concatenate(out)[:n]


def tokenize_texts(tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts as `mmjax.data.pairs.PairBuilder` writes a caption (truncated so
    `<eos>` stays last, padded) -> tokens, segment_ids `[len(texts), seq_len]`."""
    tokens = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
    segment_ids = np.zeros((len(texts), seq_len), np.int32)
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t)[:seq_len - 1] + [tokenizer.eos_id]
        tokens[i, :len(ids)], segment_ids[i, :len(ids)] = ids, 1
    return tokens, segment_ids


def text_batches(tokenizer, texts: list[str], seq_len: int, setup: TrainSetup, global_batch: int) -> list[dict]:
    """`tokenize_texts` -> global batches of `global_batch` rows (the last
    padded with copies of the first text) of `tokens`, `segment_ids` `[b, L]`
    on the mesh; the same texts on every process."""
    host = dict(zip(("tokens", "segment_ids"), tokenize_texts(tokenizer, texts, seq_len)))
    pad = -len(texts) % global_batch
    host = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in host.items()}
    return [{k: jax.make_array_from_callback((global_batch, seq_len), setup.batch_shardings[k],
                                             lambda idx, rows=v[start:start + global_batch]: rows[idx])
             for k, v in host.items()}
            for start in range(0, len(texts) + pad, global_batch)]


# ---------------------------------------------------------------- the evaluators


def check_zero_shot(settings, where: str) -> None:
    if not tuple(settings.templates):
        raise ConfigError(f"{where}.templates is empty; give at least one prompt template, e.g. ('{{}}',).")
    weighted_parts(settings.source, f"{where}.source")


def check_retrieval(settings, where: str) -> None:
    if settings.source:
        weighted_parts(settings.source, f"{where}.source")


@register_evaluator("zero_shot", fields=ZERO_SHOT_FIELDS, check=check_zero_shot)
def make_zero_shot(config, setup: TrainSetup, tokenizer, name: str = "zero_shot"):
    """Zero-shot classification by class-name prompts (module doc)."""
    problem = embedding_model_problem(config, setup)
    if problem:
        return problem
    s = config.evaluators[name]
    classes = label_set(config.data).classes
    data_cfg = _eval_data_config(config, s.source)
    with data_cfg.unlocked():
        data_cfg.pair_text, data_cfg.caption_mix = "caption", ""  # only the images and their classes are read
    batches, host = read_eval_pairs(config, tokenizer, setup, data_cfg, s.num_examples, ("class_id",))
    labelled = host["class_id"] >= 0
    if not labelled.any():
        return (f"config.evaluators.{name}.source={s.source!r} gave no image with a class label in "
                f"{s.num_examples} examples")
    prompts = [template.format(c) for c in classes for template in s.templates]
    prompt_batches = text_batches(tokenizer, prompts, config.data.seq_len, setup, config.data.global_batch)
    embed_images, embed_texts = make_embedders(setup)

    def evaluate(params) -> dict:
        prompt_embeddings = embed_batches(embed_texts, params, prompt_batches, ("tokens", "segment_ids"),
                                          len(prompts))
        image = embed_batches(embed_images, params, batches, ("image",), s.num_examples)
        metrics = zero_shot_metrics(image[labelled], class_embeddings(prompt_embeddings, len(classes)),
                                    host["class_id"][labelled])
        return {**metrics, "unlabelled": int((~labelled).sum())}

    return evaluate


@register_evaluator("retrieval", fields=RETRIEVAL_FIELDS, check=check_retrieval)
def make_retrieval(config, setup: TrainSetup, tokenizer, name: str = "retrieval"):
    """Image<->text retrieval recall@K on held-out pairs (module doc)."""
    problem = embedding_model_problem(config, setup)
    if problem:
        return problem
    s = config.evaluators[name]
    data_cfg = _eval_data_config(config, s.source or config.data.sources.caption)
    batches, host = read_eval_pairs(config, tokenizer, setup, data_cfg, s.num_examples, ("tokens",))
    embed_images, embed_texts = make_embedders(setup)

    def evaluate(params) -> dict:
        image = embed_batches(embed_images, params, batches, ("image",), s.num_examples)
        text = embed_batches(embed_texts, params, batches, ("tokens", "segment_ids"), s.num_examples)
        return retrieval_metrics(image, text, host["tokens"])

    return evaluate
