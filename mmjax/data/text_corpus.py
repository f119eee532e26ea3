"""Text-only documents from a source present in every Python install: the
`pydoc_data.topics` help pages, split into paragraph chunks."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def pydoc_chunks(max_chars: int = 800) -> tuple[str, ...]:
    """Help topics split at blank lines and regrouped into chunks of at most
    ~`max_chars` characters, in a fixed (sorted-topic) order."""
    from pydoc_data import topics

    chunks: list[str] = []
    for name in sorted(topics.topics):
        current = ""
        for para in topics.topics[name].split("\n\n"):
            para = " ".join(para.split())
            if not para:
                continue
            if current and len(current) + len(para) + 1 > max_chars:
                chunks.append(current)
                current = ""
            current = f"{current} {para}".strip()[: max_chars * 2]
        if current:
            chunks.append(current)
    return tuple(chunks)
