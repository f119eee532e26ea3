"""The chat template: a conversation record -> the pieces its example is built from.

A conversation is a raw record (`mmjax.data.records`) whose segments all carry
a `role` ("system" | "user" | "assistant"); a turn is a maximal run of
segments of one role, its images included where the source had `<image>`
(and its videos where it had `<video>`, `mmjax.data.video`).
The template (applied here only, by `render`, which the example builder calls):

  <bos>System: {system}\\n                   record's system turn, else
                                             `data.system_prompt` (none if "")
       User: {text and images}\\n
       Assistant: {answer}<eos>              <- loss here: the answer and its <eos>
       User: ...\\n
       Assistant: ...<eos>

A region in a turn (`mmjax.data.regions`) is written as the coordinates of
its box, `[x1, y1, x2, y2]` in 0..999, and (outside assistant turns, when
the example builder has region slots) followed by one region token whose
embedding the model's region sampler provides.

Role markers (`MARKERS`) and the "\\n" that ends a system or user turn are
plain text; an assistant turn ends with the `<eos>` id, and the last one is
the example's final token. Each piece is tokenized on its own, so a marker
always gives the same ids whatever follows it (the tokenizer has no chat
specials; literal special strings in text stay text).

How conversations enter the pipeline: on the existing streams, no fourth one.
Any reader turns an object with a `conversations` list into role-tagged
segments (`mmjax.data.readers.conversation`) on the stream whose source reads
it; the example builder sees the roles and uses this template. The MM1.5
fine-tuning categories map onto the streams by image count: single-image
conversations on `caption`, multi-image on `interleaved`, text-only on
`text`, so `data.mix_weights` is the category ratio, `data.loss_weights`
weighs each category's answers and `stream_counts` keeps its meaning. The
stream is the configured source's, not inferred per record.
"""

from __future__ import annotations

from typing import NamedTuple

from mmjax.data.records import ROLES

MARKERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
END_OF_TURN = "\n"  # ends a system or user turn; an assistant turn ends with <eos>


class Piece(NamedTuple):
    """One unit of the rendered conversation: `kind` "text" (`value` a str),
    "image" (`value` the image or video segment), "region" (`value` the
    region segment: its coordinates become text, `mmjax.data.regions`) or
    "eos" (`value` None); `trained` marks pieces whose tokens carry the loss."""

    kind: str
    value: object
    trained: bool


def is_conversation(record: dict) -> bool:
    """True when the record's segments carry roles."""
    return any("role" in seg for seg in record["segments"])


def turns(segments: list[dict], prompt: bool = False) -> list[tuple[str, list[dict]]]:
    """Role-tagged segments -> [(role, segments of the turn)], checked: every
    segment has a known role, assistant turns hold non-blank text (or a
    region) and no image, and the last turn is the assistant's (the user's
    for a generation `prompt`). Raises `ValueError` naming what is wrong
    (0-based turn numbers)."""
    out: list[tuple[str, list[dict]]] = []
    for n, seg in enumerate(segments):
        role = seg.get("role")
        if role not in ROLES:
            raise ValueError(f"segment {n} has {'no role' if role is None else f'unknown role {role!r}'} "
                             f"in a conversation (roles: {', '.join(ROLES)})")
        if out and out[-1][0] == role:
            out[-1][1].append(seg)
        else:
            out.append((role, [seg]))
    for n, (role, parts) in enumerate(out):
        if role != "assistant":
            continue
        if any("text" not in seg and "region" not in seg for seg in parts):
            raise ValueError(f"turn {n}: an image in an assistant turn")
        if not any(seg.get("text", "").strip() or "region" in seg for seg in parts):
            raise ValueError(f"turn {n}: the assistant turn is empty (whitespace only)")
    if prompt:
        if not out or out[-1][0] != "user":
            raise ValueError("a generation prompt does not end with a user turn")
    elif not out or out[-1][0] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn")
    return out


def render(segments: list[dict], system_prompt: str = "", prompt: bool = False) -> list[Piece]:
    """Role-tagged segments -> the template's pieces (see module doc), `<bos>`
    excluded. `system_prompt` is used when the conversation has no system
    turn. `prompt=True`: a generation prompt, which ends with a user turn and
    gets the assistant's marker for the model to continue. Raises
    `ValueError` as `turns` does."""
    grouped = turns(segments, prompt)
    if system_prompt and not any(role == "system" for role, _ in grouped):
        grouped = [("system", [{"text": system_prompt, "role": "system"}])] + grouped
    pieces: list[Piece] = []
    for role, parts in grouped:
        trained = role == "assistant"
        pieces.append(Piece("text", MARKERS[role], False))
        for seg in parts:
            if "text" in seg:
                if seg["text"]:
                    pieces.append(Piece("text", seg["text"], trained))
            elif "region" in seg:
                pieces.append(Piece("region", seg, trained))
            else:
                pieces.append(Piece("image", seg, False))
        pieces.append(Piece("eos", None, True) if trained else Piece("text", END_OF_TURN, False))
    if prompt:
        pieces.append(Piece("text", MARKERS["assistant"], False))
    return pieces
