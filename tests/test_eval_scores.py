"""Caption metrics against pycocoevalcap, the caption tokenizer against
PTBTokenizer, and VQA accuracy against hand-computed official-script values."""

import contextlib
import io
import random
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mmjax.eval.caption_scores import bleu, cider_d, tokenize_caption
from mmjax.eval.vqa_accuracy import normalize_answer, vqa_accuracy

TOLERANCE = 1e-6
VOCAB = "a the man woman dog cat on in with red blue sitting riding table two of".split()


def random_caption(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(low, high)))


def random_caption_set(seed: int, images: int = 300):
    """References (1-6 per image, 1-16 words) and predictions: some empty,
    some identical to a reference, the rest random with 0-16 words."""
    rng = random.Random(seed)
    references = {
        f"img{i}": [random_caption(rng, 1, 16) for _ in range(rng.randint(1, 6))]
        for i in range(images)
    }
    predictions = {}
    for key, refs in references.items():
        draw = rng.random()
        if draw < 0.07:
            predictions[key] = ""
        elif draw < 0.2:
            predictions[key] = rng.choice(refs)
        else:
            predictions[key] = random_caption(rng, 0, 16)
    return predictions, references


def as_coco_results(predictions):
    return {key: [caption] for key, caption in predictions.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_d_matches_pycocoevalcap(seed):
    predictions, references = random_caption_set(seed)
    mean_ref, per_image_ref = Cider().compute_score(references, as_coco_results(predictions))
    mean, per_image = cider_d(predictions, references)
    assert list(per_image) == list(references)
    diffs = [abs(per_image[k] - r) for k, r in zip(references, per_image_ref)]
    assert max(diffs) < TOLERANCE
    assert abs(mean - mean_ref) < TOLERANCE
    assert mean_ref > 0.1 and max(per_image_ref) > 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_matches_pycocoevalcap(seed):
    predictions, references = random_caption_set(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        corpus_ref, per_image_ref = Bleu(4).compute_score(
            references, as_coco_results(predictions), verbose=0)
    corpus, _ = bleu(predictions, references)
    assert max(abs(a - b) for a, b in zip(corpus, corpus_ref)) < TOLERANCE
    for order in range(1, 5):
        _, per_image = bleu(predictions, references, n=order)
        diffs = [abs(per_image[k] - r) for k, r in zip(references, per_image_ref[order - 1])]
        assert max(diffs) < TOLERANCE, order
    assert 0.05 < corpus_ref[3] < corpus_ref[0] < 1.0


def test_identical_and_empty_captions():
    references = {1: ["a man riding a horse", "a person on a horse"],
                  2: ["two dogs in the snow"], 3: ["a red bus on a street"]}
    predictions = {1: "a man riding a horse", 2: "", 3: "a red bus"}
    _, cider = cider_d(predictions, references)
    assert cider[2] == 0.0 and cider[1] > cider[3] > 0.0
    corpus, per_id = bleu(predictions, references)
    assert per_id[1] == pytest.approx(1.0) and per_id[2] < 1e-9
    assert 0.0 < corpus[3] < corpus[0] < 1.0


def test_caption_scores_refuse_mismatched_ids():
    with pytest.raises(ValueError):
        cider_d({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError):
        bleu({1: "a dog"}, {1: []})


# Outputs of pycocoevalcap's PTBTokenizer (CoreNLP 3.4.1, -lowerCase) with
# its punctuation removal; the fraction keeps a no-break space inside.
TOKENIZER_CASES = [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs, playing in the snow!", "two dogs playing in the snow"),
    ("The dog's toy isn't here; it's \"gone\".", "the dog 's toy is n't here it 's gone"),
    ("A black-and-white photo (circa 1950) of a train...",
     "a black-and-white photo -lrb- circa 1950 -rrb- of a train"),
    ("She can't / won't go: I cannot, I'm sure.", "she ca n't / wo n't go i can not i 'm sure"),
    ("A cat's whiskers' length is 3.5 cm, about 1,000 km/h.",
     "a cat 's whiskers length is 3.5 cm about 1,000 km/h"),
    ("Mr. Smith met Dr. Who at St. Louis, U.S. in 2020.",
     "mr. smith met dr. who at st. louis u.s. in 2020"),
    ("It costs $5.50 -- 50% off & more [maybe]?",
     "it costs $ 5.50 50 % off & more -lsb- maybe -rsb-"),
    ("A 10-year-old boy's bike -- wow!!!", "a 10-year-old boy 's bike wow !!!"),
    ("\u201cFancy quotes\u201d and it\u2019s a man\u2019s hat \u2014 really\u2026",
     "fancy quotes and it 's a man 's hat really"),
    ("Hello world. Another sentence here", "hello world another sentence here"),
    ("The dogs' bowls, e.g. red ones; a.m. or p.m.", "the dogs bowls e.g. red ones a.m. or p.m."),
    ("TWO   PEOPLE\twith extra    spaces", "two people with extra spaces"),
    ("A plate of food.,; with 3 1/2 sandwiches", "a plate of food. with 3\u00a01/2 sandwiches"),
    ("they're we've I'd you'll he's o'clock in the '90s",
     "they 're we 've i 'd you 'll he 's o'clock in the '90s"),
]


@pytest.mark.parametrize("caption,expected", TOKENIZER_CASES)
def test_tokenize_caption(caption, expected):
    assert tokenize_caption(caption) == expected


def ordinary_captions(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    words = ("a the man woman dog's dogs' people two 3 1,000 3.5 t-shirt isn't can't "
             "cannot it's Mr. St. U.S. e.g. sitting on red next to (blue) [x] "
             "\"quoted\" 'single' 50% $5 & / -- - ... ; : , ! ? A The").split()
    endings = ["", ".", "!", "?", " .", "...", ".\"", ")."]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) + rng.choice(endings)
            for _ in range(count)]


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_tokenize_caption_matches_ptbtokenizer():
    captions = [c for c, _ in TOKENIZER_CASES] + ordinary_captions(0, 300)
    # A neutral line after each caption: PTBTokenizer reads all captions as
    # one stream, and the next line can change how a caption's end splits.
    items = {i: [{"caption": c}, {"caption": "x"}] for i, c in enumerate(captions)}
    tokenized = PTBTokenizer().tokenize(items)
    mismatches = [(c, tokenized[i][0], tokenize_caption(c))
                  for i, c in enumerate(captions) if tokenized[i][0] != tokenize_caption(c)]
    assert not mismatches


def humans(answer: str, count: int, other: str = "no") -> list[str]:
    """Ten human answers of which `count` are `answer`."""
    return [answer] * count + [other] * (10 - count)


# Leave-one-out over 10 humans with k matching: the k subsets without a
# matching human have k - 1 matches, the other 10 - k have k, so the score is
# (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10:
# k=0 -> 0, k=1 -> 9/30 = 0.3, k=2 -> (2/3 + 16/3) / 10 = 0.6,
# k=3 -> (3 * 2/3 + 7) / 10 = 0.9, k>=4 -> 1.0.
VQA_CASES = [
    ("yes", humans("yes", 0), 0.0),
    ("yes", humans("yes", 1), 0.3),
    ("yes", humans("yes", 2), 0.6),
    ("yes", humans("yes", 3), 0.9),
    ("yes", humans("yes", 4), 1.0),
    ("yes", humans("yes", 10), 1.0),
    ("two", humans("2", 10), 1.0),
    ("Two.", humans("2", 10), 1.0),
    ("ten", humans("10", 10), 1.0),
    ("none", humans("0", 10), 1.0),
    ("twenty", humans("20", 10), 0.0),
    ("two dogs", humans("2 dogs", 10), 1.0),
    ("2", humans("two", 10), 0.0),
    ("2", humans("2", 2, "two"), 0.6),
    ("a dog", humans("dog", 10), 1.0),
    ("The Dog", humans("dog", 10), 1.0),
    ("an apple", humans("apple", 10), 1.0),
    ("yes.", humans("yes", 10), 1.0),
    ("yes", humans("yes.", 3), 0.9),
    ("yes", humans("yes.", 10), 0.0),
    ("YES!", humans("yes", 10), 1.0),
    ("  yes\n", humans("yes", 10), 1.0),
    ("yes\tno", humans("yes no", 10), 1.0),
    ("1,000", humans("1000", 10), 1.0),
    ("1000", humans("1,000", 1, "500"), 0.3),
    ("3.5", humans("3.5", 10), 1.0),
    ("3.5", humans("35", 10), 0.0),
    ("3.5.", humans("3.5", 10), 1.0),
    ("2.", humans("2", 10), 1.0),
    ("dont", humans("don't", 10), 1.0),
    ("Dont", humans("don't", 10), 1.0),
    ("don't", humans("don't", 10), 1.0),
    ("oclock", humans("o'clock", 10), 1.0),
    ("black-and-white", humans("black and white", 10), 1.0),
    ("black - white", humans("black white", 10), 1.0),
    ("red/white", humans("red white", 10), 1.0),
    ("(yes)", humans("yes", 10), 1.0),
    ("st. louis", humans("st louis", 10), 1.0),
    ("1,000 red-cars", humans("1000 redcars", 10), 1.0),
    ("", humans("yes", 10), 0.0),
]


@pytest.mark.parametrize("prediction,answers,expected", VQA_CASES)
def test_vqa_accuracy(prediction, answers, expected):
    assert len(answers) == 10
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_leaves_out_positions_not_values():
    answers = ["yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"]
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    assert vqa_accuracy("yes", answers) == pytest.approx(0.9)


def test_vqa_accuracy_normalized_humans():
    assert vqa_accuracy("2", humans("two", 10)) == 0.0
    assert vqa_accuracy("2", humans("two", 10), normalize_humans=True) == 1.0
    assert vqa_accuracy("dog", humans("the dog", 2), normalize_humans=True) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


@pytest.mark.parametrize("text,expected", [
    ("Black-and-White", "black and white"),
    ("The two dogs", "2 dogs"),
    ("1,000", "1000"),
    ("3.5.", "3.5"),
    (".5", ".5"),
    ("x, y", "x y"),
    ("x,y", "x y"),
    ("dont", "don't"),
    ("a", ""),
    ("What's up?!", "what's up"),
    ("12,5 cm-long", "125 cmlong"),
    ("a" + "." * 40, "a" + "." * 8),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected
