"""Label sets of image-level supervision: MOFI's entity labels, and the
classes and super-classes of image classification (Mobile V-MoE).

`config.data.labels`:
  entities      "procedural" (the shapes vocabulary: the colour words, then
                the kinds) or a text file, one entity name per line
  classes       "procedural" (the shape kinds; super-classes round / angular)
                or a text file of `class<TAB>superclass` lines (a line
                without a tab: the class is its own super-class)
  max_entities  entity slots per pair batch row (`entity_ids [b, K]`)

A record names its labels by string (`record["labels"]`, see
`mmjax.data.pairs`); `LabelSet.ids` turns them into ids, counting the names
the set does not hold.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from mmjax.data import shapes
from mmjax.data.records import DataError

PROCEDURAL = "procedural"
# The procedural super-classes: a shape's outline is curved or made of straight edges.
SHAPE_SUPERCLASSES = ("round", "angular")
SHAPE_SUPERCLASS_OF = {"circle": "round", "square": "angular", "triangle": "angular", "cross": "angular"}


@dataclasses.dataclass(frozen=True)
class LabelSet:
    entities: tuple[str, ...]
    classes: tuple[str, ...]
    superclasses: tuple[str, ...]
    superclass_of: tuple[int, ...]  # class id -> superclass id

    @functools.cached_property
    def _index(self) -> dict:
        return {"entities": {n: i for i, n in enumerate(self.entities)},
                "classes": {n: i for i, n in enumerate(self.classes)},
                "superclasses": {n: i for i, n in enumerate(self.superclasses)}}

    def ids(self, kind: str, names) -> tuple[list[int], int]:
        """Names of `kind` ("entities", "classes", "superclasses") -> (their
        ids in order, how many names the set does not hold)."""
        index = self._index[kind]
        ids = [index[n] for n in names if n in index]
        return ids, len(list(names)) - len(ids)


def _read_lines(path: str, where: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}={path!r}: no such file (one label per line, or 'procedural').")
    lines = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(f"{where}={path!r}: the file holds no labels.")
    return lines


def _unique(names: list[str], where: str, path: str) -> tuple[str, ...]:
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f"{where}={path!r}: the label {n!r} is listed twice.")
        seen.add(n)
    return tuple(names)


def _entities(spec: str) -> tuple[str, ...]:
    where = "config.data.labels.entities"
    if spec == PROCEDURAL:
        return tuple(shapes.COLOURS) + shapes.KINDS
    return _unique([line.strip() for line in _read_lines(spec, where)], where, spec)


def _classes(spec: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    where = "config.data.labels.classes"
    if spec == PROCEDURAL:
        classes = shapes.KINDS
        return classes, SHAPE_SUPERCLASSES, tuple(SHAPE_SUPERCLASSES.index(SHAPE_SUPERCLASS_OF[c]) for c in classes)
    pairs = [(line.split("\t", 1) + [None])[:2] for line in _read_lines(spec, where)]
    classes = _unique([c.strip() for c, _ in pairs], where, spec)
    supers = [(s if s is not None else c).strip() for c, s in pairs]
    superclasses = tuple(dict.fromkeys(supers))
    return classes, superclasses, tuple(superclasses.index(s) for s in supers)


@functools.lru_cache(maxsize=16)
def _label_set(entities: str, classes: str) -> LabelSet:
    return LabelSet(_entities(entities), *_classes(classes))


def label_set(data_cfg) -> LabelSet:
    """The label set `config.data.labels` names (module doc); DataError for a
    missing or malformed file."""
    labels = data_cfg.get("labels", {}) if hasattr(data_cfg, "get") else {}
    return _label_set(str(labels.get("entities", PROCEDURAL)), str(labels.get("classes", PROCEDURAL)))
