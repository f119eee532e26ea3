"""Byte-level BPE tokenizer trained locally on the default corpus and cached.

Special tokens have fixed ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<image>`=3.
The trained tokenizer is cached as JSON under `$MMJAX_CACHE_DIR` (default
`~/.cache/mmjax`), keyed by a hash of its training corpus and vocab size.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
SPECIALS = (PAD, BOS, EOS, IMAGE)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MMJAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "mmjax"))


def _split_specials(text: str) -> list[tuple[int, str]]:
    """Splits `text` inside every special-token string ("<image>" -> "<",
    "image>") so the pieces cannot match a special token; returns
    `(start offset, piece)` pairs."""
    cuts = sorted({i + 1 for special in SPECIALS for i in _find_all(text, special)})
    bounds = [0] + cuts + [len(text)]
    return [(a, text[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _find_all(text: str, pattern: str) -> list[int]:
    found, i = [], text.find(pattern)
    while i >= 0:
        found.append(i)
        i = text.find(pattern, i + 1)
    return found


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the mmjax special ids."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer):
        self._tok = hf_tokenizer
        ids = [hf_tokenizer.token_to_id(s) for s in SPECIALS]
        if ids != [0, 1, 2, 3]:
            raise ValueError(f"tokenizer special ids must be <pad>=0 <bos>=1 <eos>=2 <image>=3, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in the text (e.g. a literal
        "<image>") are encoded as ordinary text, never as special ids."""
        ids: list[int] = []
        for _, piece in _split_specials(text):
            ids += self._tok.encode(piece, add_special_tokens=False).ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and the `(start, end)` character span of each token."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, piece in _split_specials(text):
            enc = self._tok.encode(piece, add_special_tokens=False)
            ids += enc.ids
            offsets += [(start + a, start + b) for a, b in enc.offsets]
        return ids, offsets

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE with the mmjax specials first in the vocabulary."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def load_or_train(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Returns the cached tokenizer for (texts, vocab_size), training it on first use."""
    digest = hashlib.sha256(f"{vocab_size}\0{tokenizers.__version__}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "replace") + b"\0")
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.exists():
        try:
            return Tokenizer.load(path)
        except Exception:  # a half-written or corrupt cache entry is rebuilt
            path.unlink(missing_ok=True)
    tok = train_tokenizer(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok
