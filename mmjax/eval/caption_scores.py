"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them.

`cider_d` is CIDEr-D (Vedantam et al., 2015) and `bleu` is BLEU-1..4 with
the "closest" effective reference length and the scorer's smoothing
constants, both on already-tokenised captions (tokens joined by spaces).
`tokenize_caption` is a pure-Python stand-in for the Java PTBTokenizer plus
punctuation removal that the COCO evaluation runs first; it covers ordinary
English captions (words, numbers, hyphenated words, contractions, common
abbreviations, the usual punctuation), not URLs, e-mail addresses or
SGML-like tags. PTBTokenizer reads all captions as one stream, so a final
"A." or "no." can split differently depending on the next caption; here each
caption stands alone.
"""

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

NGram = tuple[str, ...]

# Tokens that the COCO evaluation drops after PTB tokenisation. The bracket
# names are upper-case there, so lower-cased brackets (-lrb- ...) survive.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Abbreviations whose final period PTBTokenizer keeps in the token.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr drs st ave vs ft inc co ltd corp mt jan feb mar apr jun "
    "jul aug sep sept oct nov dec etc jr sr prof profs gen col lt sgt capt "
    "rev hon sen sens rep reps gov govs bros blvd rd est dept univ al mon "
    "tue tues wed thu thurs fri sq cf cie esq mme pres ste messrs adm maj "
    "cpl pvt det lieut brig cmdr pfc spc supt attys calif fla ariz colo conn "
    "md mich minn mo nev okla tenn va wis wyo ala ga ky kan neb vt".split()
)

# Words that PTBTokenizer splits in two.
SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "wanna": ("wan", "na"),
    "gotta": ("got", "ta"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}

# Capitalised words after which PTBTokenizer reads "X." as a sentence end.
SENTENCE_STARTS = (
    "About According Additionally After An A As At But Earlier He Her Here "
    "However If In It Last Many More Mr. Ms. Now Once One Other Our She "
    "Since So Some Such That The Then There These They This We When While "
    "What Yet You".split()
)

BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
            "{": "-lcb-", "}": "-rcb-"}

UNICODE_PUNCTUATION = str.maketrans({
    "\u2018": "`", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ",
})

_ALNUM = r"\w"
_LETTER = r"[^\W\d_]"
_ABBREVIATION = "|".join(sorted(ABBREVIATIONS, key=len, reverse=True))
_STARTER = "|".join(re.escape(w) for w in SENTENCE_STARTS)
_TOKEN = re.compile(
    rf"""
    (?P<initial>{_LETTER}\.(?!{_ALNUM})(?!\s+(?-i:{_STARTER})(?:\s|$)))
    | (?P<acronym>{_LETTER}(?:\.{_LETTER})+\.(?!{_ALNUM}))
    | (?P<abbreviation>(?:{_ABBREVIATION})\.(?!{_ALNUM})|no\.(?=[ \t]?\d))
    | (?P<year>'(?:\d\ds?|til|n')(?=\s|$))
    | (?P<clitic>(?:n't|'(?:s|m|re|ve|ll|d))(?!{_ALNUM})|'t(?=(?:is|was)\b))
    | (?P<signed>(?<!\S)-\d+(?:[.,:]\d+)*)
    | (?P<fraction>(?<![\w,.])(?:\d{{1,4}}[- ])?\d{{1,4}}/\d{{1,4}}(?![/\w]))
    | (?P<decimal>\.\d+)
    | (?P<word>{_ALNUM}+(?:(?:[-'./]|(?<=\d)[,:](?=\d)){_ALNUM}+)*
               (?:\.(?=[,;:]))?)
    | (?P<dots>\.+)
    | (?P<dashes>-+)
    | (?P<marks>[!?]+)
    | (?P<tag>[#@]{_LETTER}{_ALNUM}*|\*+|\#+|@+)
    | (?P<other>\S)
    """,
    re.VERBOSE | re.IGNORECASE,
)
_KEPT = frozenset(["initial", "acronym", "abbreviation", "year", "clitic",
                   "signed", "decimal", "marks", "tag"])
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
_NUMBER_WORD = re.compile(rf"^(\d+(?:[.,]\d+)+)({_LETTER}+)$")


def _split_clitics(word: str) -> list[str]:
    """'she'll've' -> she 'll 've; "don't" -> do n't; 'cannot' -> can not."""
    if word in SPLIT_WORDS:
        return list(SPLIT_WORDS[word])
    suffixes: list[str] = []
    while (match := _CLITIC.match(word)) is not None:
        word, suffix = match.groups()
        suffixes.insert(0, suffix)
    return [word, *suffixes]


def _word_tokens(word: str) -> list[str]:
    """PTB tokens of one word: clitics split, a number glued to letters split.
    A period before , ; or : stays on a plain word ("dog.," -> "dog.")."""
    stem = word.removesuffix(".")
    number = _NUMBER_WORD.match(stem)
    parts = list(number.groups()) if number else _split_clitics(stem)
    if stem == word:
        return parts
    if len(parts) == 1 and not stem[0].isdigit():
        return [word]
    return [*parts, "."]


def _ptb_tokens(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of a caption, punctuation still in."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        kind, value = match.lastgroup, match.group().lower()
        if kind in _KEPT:
            tokens.append(value)
        elif kind == "fraction":
            tokens.append(value.replace(" ", "\u00a0"))
        elif kind == "word":
            tokens.extend(_word_tokens(value))
        elif kind == "dots":
            tokens.append("." if len(value) == 1 else "...")
        elif kind == "dashes":
            tokens.append("--" if 3 <= len(value) <= 4 else value)
        elif value in BRACKETS:
            tokens.append(BRACKETS[value])
        elif value == '"':
            tokens.append("''")
        else:
            tokens.append(value)
    return tokens


def tokenize_caption(text: str) -> str:
    """Lower-cased tokens without punctuation, joined by single spaces, as the
    COCO evaluation's PTBTokenizer step produces them."""
    text = text.replace("\n", " ").translate(UNICODE_PUNCTUATION)
    return " ".join(t for t in _ptb_tokens(text) if t not in PUNCTUATIONS)


def ngram_counts(caption: str, max_n: int) -> Counter[NGram]:
    """Counts of all 1..max_n-grams of a space-separated caption."""
    words = caption.split()
    return Counter(
        tuple(words[i:i + k])
        for k in range(1, max_n + 1)
        for i in range(len(words) - k + 1)
    )


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not references:
        raise ValueError("no captions to score")
    if any(len(refs) == 0 for refs in references.values()):
        raise ValueError("every id needs at least one reference caption")


# --- CIDEr-D -----------------------------------------------------------------


def _tfidf(counts: Counter[NGram], df: Counter[NGram], log_docs: float,
           max_n: int) -> tuple[list[dict[NGram, float]], list[float]]:
    """Per-order TF-IDF vectors (tf * log(N / max(1, df))) and their norms."""
    vectors: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    for gram, tf in counts.items():
        idf = log_docs - math.log(max(1.0, df[gram]))
        vectors[len(gram) - 1][gram] = tf * idf
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
    return vectors, norms


def _cider_pair(hyp: tuple, ref: tuple, sigma: float) -> float:
    """Sum over orders of the clipped cosine, times the Gaussian length penalty.
    (pycocoevalcap counts length in bigrams: one less for any non-empty
    caption, and an empty caption scores 0 either way, so the penalty agrees.)"""
    (hyp_vecs, hyp_norms, hyp_len), (ref_vecs, ref_norms, ref_len) = hyp, ref
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
    total = 0.0
    for hv, hn, rv, rn in zip(hyp_vecs, hyp_norms, ref_vecs, ref_norms):
        dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in hv.items())
        total += (dot / (hn * rn) if hn and rn else dot) * penalty
    return total


def cider_d(predictions: Mapping[Hashable, str],
            references: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0
            ) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of tokenised captions: (mean over ids, score per id, in the
    order of `references`).

    Document frequencies are counted over the reference sets of exactly the
    ids given, so a score depends on the whole evaluated set."""
    _check_inputs(predictions, references)
    ref_counts = {i: [ngram_counts(r, n) for r in refs]
                  for i, refs in references.items()}
    df: Counter[NGram] = Counter()
    for counts in ref_counts.values():
        df.update(set().union(*counts))
    log_docs = math.log(float(len(references)))

    def features(caption: str, counts: Counter[NGram]) -> tuple:
        return (*_tfidf(counts, df, log_docs, n), len(caption.split()))

    scores = {}
    for i, captions in references.items():
        hyp = features(predictions[i], ngram_counts(predictions[i], n))
        refs = [features(r, c) for r, c in zip(captions, ref_counts[i])]
        total = sum(_cider_pair(hyp, ref, sigma) for ref in refs)
        scores[i] = total / n / len(refs) * 10.0
    return sum(scores.values()) / len(scores), scores


# --- BLEU --------------------------------------------------------------------

# Smoothing of the COCO BLEU scorer: (correct + TINY) / (guessed + SMALL).
TINY = 1e-15
SMALL = 1e-9


def _bleu_stats(prediction: str, refs: Sequence[str], n: int
                ) -> tuple[int, int, list[int], list[int]]:
    """(hypothesis length, closest reference length, guessed, correct)."""
    hyp_len = len(prediction.split())
    closest = min((abs(len(r.split()) - hyp_len), len(r.split())) for r in refs)[1]
    max_ref: Counter[NGram] = Counter()
    for ref in refs:
        max_ref |= ngram_counts(ref, n)
    guessed = [max(0, hyp_len - k) for k in range(n)]
    correct = [0] * n
    for gram, count in ngram_counts(prediction, n).items():
        correct[len(gram) - 1] += min(count, max_ref[gram])
    return hyp_len, closest, guessed, correct


def _bleu_from_stats(hyp_len: float, ref_len: float, guessed: Sequence[float],
                     correct: Sequence[float]) -> list[float]:
    """Smoothed BLEU-1..n with the brevity penalty from summed statistics."""
    scores, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guessed)):
        product *= (c + TINY) / (g + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + TINY) / (ref_len + SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


def bleu(predictions: Mapping[Hashable, str],
         references: Mapping[Hashable, Sequence[str]], n: int = 4
         ) -> tuple[list[float], dict[Hashable, float]]:
    """Corpus BLEU-1..n of tokenised captions and the BLEU-n of each id."""
    _check_inputs(predictions, references)
    stats = {i: _bleu_stats(predictions[i], refs, n) for i, refs in references.items()}
    per_id = {i: _bleu_from_stats(*s)[-1] for i, s in stats.items()}
    hyp_len = sum(s[0] for s in stats.values())
    ref_len = sum(s[1] for s in stats.values())
    guessed = [sum(s[2][k] for s in stats.values()) for k in range(n)]
    correct = [sum(s[3][k] for s in stats.values()) for k in range(n)]
    return _bleu_from_stats(hyp_len, ref_len, guessed, correct), per_id
