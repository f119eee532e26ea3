"""Multiple-choice text tasks scored by log-likelihood, as lm-evaluation-harness
scores HellaSwag, ARC or PIQA: evaluator kind `multiple_choice`.

Settings (`config.evaluators.<name>`): `path` (JSONL of `{"context",
"choices", "gold"}`, a glob allowed), `support_path` (demonstrations; empty:
the same file, never the query), `shots`, `num_examples` (0: all),
`separator` (between demonstrations), `batch_size` (0: data.global_batch),
`max_len` (0: data.seq_len), `seed`.

For each choice the model reads `<bos>` + demonstrations + context and is
scored on the choice's tokens (`" " + choice`): `accuracy@{k}shot` picks the
choice with the largest summed log-probability, `accuracy_norm@{k}shot` the
largest per byte of the choice (lm-evaluation-harness's acc_norm). Prompts
longer than `max_len` drop their oldest demonstrations
(`dropped_shots@{k}shot`); a choice that still does not fit is cut from the
left of the context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.errors import ConfigError
from mmjax.eval import formats
from mmjax.eval.batching import LENGTH_BUCKET, chunks, place
from mmjax.eval.tasks import check_shots
from mmjax.models import model_spec
from mmjax.train.config_schema import integer, one_of, sequence_of, text
from mmjax.train.evaluators import register_evaluator
from mmjax.train.step import model_logits

FIELDS = {
    "format": one_of(lambda: ("jsonl",)),
    "path": text,
    "support_path": text,
    "shots": sequence_of(None, integer(0), "a tuple of non-negative shot counts, e.g. (0, 1)"),
    "num_examples": integer(0),
    "separator": text,
    "batch_size": integer(0),
    "max_len": integer(0),
    "seed": integer(0),
}


def _row_batch(rows: list[tuple[list[int], int]], batch_size: int, uses_images: bool, image_size: int) -> dict:
    """rows of (ids, number of scored tokens at the end) -> padded host arrays."""
    rows = rows + [rows[0]] * (batch_size - len(rows))
    length = -(-max(len(ids) for ids, _ in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length), np.float32)  # 1 where the token at t+1 is scored from position t
    for i, (ids, n) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        scored[i, len(ids) - 1 - n:len(ids) - 1] = 1.0
    valid = (np.arange(length)[None, :] < np.array([len(ids) for ids, _ in rows])[:, None])
    batch = {"tokens": tokens, "scored": scored, "segment_ids": valid.astype(np.int32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()}
    if uses_images:
        batch["image_slots"] = np.full(tokens.shape, -1, np.int32)
        batch["images"] = np.zeros((batch_size, 1, image_size, image_size, 3), np.uint8)
    return batch


class ChoiceTask:
    """evaluate(params) -> metrics, see the module doc."""

    def __init__(self, config, setup, tokenizer, name: str):
        s = self.settings = config.evaluators[name]
        self.name, self.tokenizer, self.setup = name, tokenizer, setup
        where = f"config.evaluators.{name}"
        self.items, self.skipped = formats.read_multiple_choice(where, s.path)
        if s.num_examples:
            self.items = self.items[:s.num_examples]
        self.support = formats.read_multiple_choice(f"{where}.support", s.support_path)[0] \
            if s.support_path else self.items
        available = len(self.support) - (0 if s.support_path else 1)
        if max(s.shots) > available:
            raise ConfigError(f"{where}.shots={tuple(s.shots)} asks for {max(s.shots)} demonstrations but the "
                              f"support set holds {available}.")
        self.max_len = s.max_len or config.data.seq_len
        self.batch_size = s.batch_size or config.data.global_batch
        self.uses_images = model_spec(config.model).uses_images
        self.image_size = config.data.image_size
        self.batch_spec = setup.batch_shardings["tokens"].spec[0]
        self.predictions: list[dict] = []
        self.progress_factory = None

        def loglik(params, batch):
            logits = model_logits(setup.graphdef, params, batch, setup.resolver)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            targets = jnp.roll(batch["tokens"], -1, axis=1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return (picked * batch["scored"]).sum(axis=-1)

        self.loglik = jax.jit(loglik, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))

    def _rows(self, shots: int) -> tuple[list[tuple[list[int], int]], int]:
        """One (ids, scored count) per item and choice, and the demonstrations dropped."""
        s, rows, dropped = self.settings, [], 0
        for index, item in enumerate(self.items):
            order = np.random.default_rng([s.seed, index]).permutation(len(self.support))
            demos = [self.support[i] for i in order if self.support[i] is not item][:shots]
            longest = max(len(self.tokenizer.encode(" " + c)) for c in item.choices)
            while True:
                text_demos = "".join(d.context + " " + d.choices[d.gold] + s.separator for d in demos)
                context = [self.tokenizer.bos_id] + self.tokenizer.encode(text_demos + item.context)
                if len(context) + longest <= self.max_len or not demos:
                    break
                demos, dropped = demos[1:], dropped + 1
            for choice in item.choices:
                ids = self.tokenizer.encode(" " + choice)
                full = context + ids
                if len(full) > self.max_len:  # keep <bos>, cut the context from the left
                    full = full[:1] + full[len(full) - self.max_len + 1:]
                rows.append((full, len(ids)))
        return rows, dropped

    def __call__(self, params) -> dict:
        metrics, self.predictions = {"skipped": self.skipped}, []
        for shots in self.settings.shots:
            rows, dropped = self._rows(shots)
            bar = self.progress_factory(len(rows), f"{self.name} {shots}-shot") if self.progress_factory else None
            scores = []
            for part in chunks(rows, self.batch_size):
                batch = place(_row_batch(part, self.batch_size, self.uses_images, self.image_size),
                              self.setup.mesh, self.batch_spec)
                scores += np.asarray(jax.device_get(self.loglik(params, batch)))[:len(part)].tolist()
                if bar:
                    bar.update(len(part))
            if bar:
                bar.close()
            correct = correct_norm = 0
            cursor = 0
            for item in self.items:
                ll = np.array(scores[cursor:cursor + len(item.choices)])
                cursor += len(item.choices)
                per_byte = ll / np.array([max(1, len(c.encode())) for c in item.choices])
                pick, pick_norm = int(np.argmax(ll)), int(np.argmax(per_byte))
                correct += pick == item.gold
                correct_norm += pick_norm == item.gold
                self.predictions.append({"id": item.id, "shots": shots, "loglikelihoods": ll.tolist(),
                                         "prediction": pick, "prediction_norm": pick_norm, "gold": item.gold,
                                         "score": float(pick == item.gold)})
            metrics[f"accuracy@{shots}shot"] = 100.0 * correct / len(self.items)
            metrics[f"accuracy_norm@{shots}shot"] = 100.0 * correct_norm / len(self.items)
            metrics[f"scored@{shots}shot"] = len(self.items)
            metrics[f"dropped_shots@{shots}shot"] = dropped
        return metrics


def check_files(settings, where: str) -> None:
    check_shots(settings, where)
    formats.expand(f"{where}.path", settings.path)
    if settings.support_path:
        formats.expand(f"{where}.support_path", settings.support_path)


@register_evaluator("multiple_choice", fields=FIELDS, check=check_files)
def make_choice_task(config, setup, tokenizer, name: str):
    return ChoiceTask(config, setup, tokenizer, name)
