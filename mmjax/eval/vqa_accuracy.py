"""VQA accuracy exactly as the official VQA evaluation script (vqaEval.py from
GT-Vision-Lab/VQA) computes it.

The prediction is normalised: newlines and tabs to spaces, strip, the
script's punctuation rules, lower-case, number words to digits, articles
dropped, its contraction fixes. Human answers get only the punctuation rules,
and only when they are not all the same, because the released annotations
are already normalised; `normalize_humans=True` normalises them fully, as
evaluators for raw human answers (TextVQA-style) do. A question scores the
mean, over the leave-one-out subsets of the human answers, of
min(1, matches among the others / 3): with 10 humans, 1 matching gives 0.3,
2 give 0.6, 3 give 0.9 and 4 or more give 1.0.

The script's period rule is written `(?!<=\\d)(\\.)(?!\\d)`, a look-ahead where a
look-behind was meant: it drops every period not followed by a digit ("5."
-> "5", "3.5" kept, ".5" kept), at most 32 per answer (`re.UNICODE` is
passed as the count). Both quirks are kept here.

No package on PyPI ships the official script on its own: copies live inside
salesforce-lavis and open-flamingo, which pull in torch and much more, so
tests check hand-computed cases instead.
"""

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}

ARTICLES = frozenset(["a", "an", "the"])

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
               "_", "-", ">", "<", "@", "`", ",", "?", "!")

_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_MAX_PERIODS_DROPPED = 32


def strip_punctuation(text: str) -> str:
    """The script's punctuation step. A mark is deleted when the answer has it
    next to a space or contains a digit-comma-digit anywhere ("1,000" ->
    "1000"), otherwise replaced by a space ("black-and-white" -> "black and
    white"); periods not followed by a digit are deleted. Case is kept."""
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        delete = glue or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_DROPPED)


def _digits_articles_contractions(text: str) -> str:
    words = (NUMBER_WORDS.get(w, w) for w in text.lower().split())
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full normalisation the script applies to a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(strip_punctuation(text))


def _human_forms(answers: Sequence[str], normalize: bool) -> list[str]:
    if normalize:
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:
        return [strip_punctuation(a) for a in answers]
    return list(answers)


def vqa_accuracy(prediction: str, human_answers: Sequence[str],
                 normalize_humans: bool = False) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers
    (10 in VQA v1/v2); the script reports 100 times this, rounded."""
    if isinstance(human_answers, str) or not human_answers:
        raise ValueError("human_answers must be a non-empty list of strings")
    predicted = normalize_answer(prediction)
    matches = [h == predicted for h in _human_forms(human_answers, normalize_humans)]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)
