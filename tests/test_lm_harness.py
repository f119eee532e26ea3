"""The lm-evaluation-harness adapter: log-likelihoods and greedy flags equal
a plain forward pass, generation equals greedy decoding by full forward
passes cut at the stop strings, long inputs are cut or windowed as the
harness does, and (with lm_eval installed) a local task runs end to end."""

import json
import sys

import jax
import numpy as np
import pytest

from conftest import small_config
from mmjax.eval import lm_harness
from mmjax.eval.lm_harness import MmjaxLM, cut_at_stops, fit_left, load_config, rolling_windows
from mmjax.train.step import model_logits

REF_LEN = 128  # every reference forward pass is padded to this length (one compilation)


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir) holding a checkpoint of freshly initialised
    parameters at step 2, saved as training saves it."""
    import grain

    from mmjax.parallel import get_layout, make_mesh
    from mmjax.train.checkpoint import Checkpointer
    from mmjax.train.loop import build_step
    from mmjax.train.state import init_train_state

    config = small_config(steps=2)
    config.eval.caption_accuracy = False
    workdir = str(tmp_path_factory.mktemp("lm_harness") / "run")
    setup, _ = build_step(config, make_mesh(dict(config.mesh)), get_layout(config.rules))
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(2, init_train_state(config, setup), iter(grain.MapDataset.range(8).to_iter_dataset()))
    checkpointer.close()
    return config, workdir


@pytest.fixture(scope="module")
def lm(trained):
    return MmjaxLM(*trained, progress=False)


@pytest.fixture(scope="module")
def reference(lm):
    """`fn(ids) -> (log-probs [L-1, vocab] of ids[1:]'s positions, argmax [L-1])`
    from one unpadded-equivalent forward pass (right padding, causal)."""
    size = lm.config.data.image_size
    forward = jax.jit(lambda params, batch: jax.nn.log_softmax(
        model_logits(lm.setup.graphdef, params, batch).astype(np.float32), axis=-1))

    def run(ids):
        n = len(ids)
        tokens = np.zeros((1, REF_LEN), np.int32)
        tokens[0, :n] = ids
        batch = {"tokens": tokens, "segment_ids": (np.arange(REF_LEN) < n)[None].astype(np.int32),
                 "positions": np.arange(REF_LEN, dtype=np.int32)[None],
                 "image_slots": np.full((1, REF_LEN), -1, np.int32),
                 "images": np.zeros((1, 1, size, size, 3), np.uint8)}
        logp = np.asarray(forward(lm.params, batch))[0, :n - 1]
        return logp, logp.argmax(-1)

    return run


def _expected(reference, ids, n):
    logp, best = reference(ids)
    targets = np.asarray(ids[1:])
    picked = logp[np.arange(len(targets)), targets][-n:]
    return float(picked.sum()), bool((best[-n:] == targets[-n:]).all())


def _greedy(reference, ids, steps, eos):
    out = []
    for _ in range(steps):
        _, best = reference(ids + out + [0])
        out.append(int(best[-1]))
        if out[-1] == eos:
            return out[:-1]
    return out


def test_windows_cut_and_stops():
    # The harness's documented example: tokens 0..9, <bos>=B, 4 positions per window.
    assert rolling_windows(list(range(10)), -1, 4) == [([-1, 0, 1, 2, 3], 4), ([3, 4, 5, 6, 7], 4),
                                                       ([5, 6, 7, 8, 9], 2)]
    for length in (1, 4, 5, 13):
        windows = rolling_windows(list(range(length)), -1, 4)
        assert [t for ids, n in windows for t in ids[len(ids) - n:]] == list(range(length))
        assert all(len(ids) <= 5 for ids, _ in windows)
    assert rolling_windows([], -1, 4) == []
    assert fit_left([1, 5, 6, 7, 8], 3) == [1, 7, 8] and fit_left([1, 5], 3) == [1, 5]
    assert cut_at_stops("a b\nc.d", ["\n", "."]) == "a b" and cut_at_stops(" x ", ["", "\n"]) == " x "


def test_windows_match_lm_eval():
    """Skipped where lm_eval is not installed (CI)."""
    utils = pytest.importorskip("lm_eval.utils")
    for length, max_len in ((1, 4), (10, 4), (13, 5), (64, 64), (130, 64)):
        tokens = list(range(length))
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, -1, max_len, 1)]
        assert rolling_windows(tokens, -1, max_len) == [(a + b, len(b)) for a, b in theirs]


def test_config_files_and_registration_without_lm_eval(monkeypatch):
    assert load_config("experiments/tiny.py:smoke").train.steps == 40
    assert load_config("experiments/tiny.py").train.steps == 300
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.models", None)
    assert lm_harness.register() is None


@pytest.mark.slow
def test_loglikelihood_equals_a_plain_forward_pass(lm, reference):
    tok = lm.tokenizer
    pairs = [("A red circle is", " above a blue square"), ("Shapes:", " two green triangles"),
             ("", "a yellow star"), ("trailing space ", "moves"), ("x" * 300, " long context cut")]
    results = lm.loglikelihood([Request(c, t) for c, t in pairs])
    for (context, continuation), (value, greedy) in zip(pairs, results):
        ids, n = lm.pair_row(context, continuation)
        assert ids[0] == tok.bos_id and len(ids) <= lm.seq_len + 1
        if len(context) < 100:  # the context's trailing spaces start the continuation
            stripped = context.rstrip()
            scored = tok.encode(context[len(stripped):] + continuation)
            assert ids == [tok.bos_id] + tok.encode(stripped) + scored and n == len(scored)
        want, want_greedy = _expected(reference, ids, n)
        assert value == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert len(lm.pair_row("x" * 300, " long context cut")[0]) == lm.seq_len + 1


@pytest.mark.slow
def test_greedy_flag_is_true_only_for_the_argmax(lm, reference):
    tok = lm.tokenizer
    context = [tok.bos_id] + tok.encode("A red circle")
    best = _greedy(reference, context, 3, eos=-1)
    other = best[:-1] + [(best[-1] + 7) % tok.vocab_size]
    (s_best, g_best), (s_other, g_other) = lm.score_rows([(context + best, 3), (context + other, 3)], "t")
    assert g_best and not g_other
    assert s_best == pytest.approx(_expected(reference, context + best, 3)[0], abs=1e-4)
    assert s_other == pytest.approx(_expected(reference, context + other, 3)[0], abs=1e-4)
    text = tok.decode(best)
    if tok.encode("A red circle" + text)[len(context) - 1:] == best:
        assert lm.loglikelihood([Request("A red circle", text)])[0][1]


@pytest.mark.slow
def test_rolling_sums_windows_of_a_plain_forward_pass(lm, reference):
    tok = lm.tokenizer
    short, long = "two small squares", " ".join(["a red circle above a blue square"] * 12)
    got = lm.loglikelihood_rolling([Request(short), Request(long)])
    ids = [tok.bos_id] + tok.encode(short)
    assert got[0] == pytest.approx(_expected(reference, ids, len(ids) - 1)[0], abs=1e-4)
    windows = rolling_windows(tok.encode(long), tok.bos_id, lm.seq_len)
    assert len(windows) > 1
    assert got[1] == pytest.approx(sum(_expected(reference, w, n)[0] for w, n in windows), abs=1e-3)


@pytest.mark.slow
def test_generate_until_is_greedy_decoding_cut_at_the_stops(lm, reference):
    tok = lm.tokenizer
    contexts = ["A red circle", "Two shapes: a green", "y" * 200]
    requests = [Request(contexts[0], {"until": ["\n\n"], "max_gen_toks": 6}),
                Request(contexts[1], {"until": "\n\n", "max_gen_toks": 9}),
                Request(contexts[2], {"until": [], "max_gen_toks": 6, "do_sample": False})]
    plain = lm.generate_until(requests)
    for req, got in zip(requests, plain):
        context, kwargs = req.args
        prompt = fit_left([tok.bos_id] + tok.encode(context), lm.seq_len - kwargs["max_gen_toks"])
        expected = tok.decode(_greedy(reference, prompt, kwargs["max_gen_toks"], tok.eos_id))
        assert got == cut_at_stops(expected, ["\n\n"])
    stop = plain[0][len(plain[0]) // 2:][:2]
    if stop.strip():
        cut = lm.generate_until([Request(contexts[0], {"until": [stop], "max_gen_toks": 6})])[0]
        assert cut == plain[0].split(stop)[0] and len(cut) < len(plain[0])
    assert lm.new_tokens({"max_gen_toks": 10_000}) == lm.seq_len // 2
    assert lm.new_tokens({}) == min(lm_harness.DEFAULT_MAX_GEN_TOKS, lm.seq_len // 2)


def _write_tasks(folder, data):
    rows = [{"question": "A red circle is", "choices": ["above", "below", "green"], "gold": 0, "answer": "x"},
            {"question": "Two blue", "choices": ["squares", "circles"], "gold": 1, "answer": "y"},
            {"question": "A yellow star and", "choices": ["a square", "two"], "gold": 0, "answer": "z"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "choice.yaml").write_text(
        "task: mmjax_tiny_choice\n" + source + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: gold\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    (folder / "gen.yaml").write_text(
        "task: mmjax_tiny_gen\n" + source + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: answer\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    (folder / "rolling.yaml").write_text(
        "task: mmjax_tiny_rolling\n" + source + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "metadata:\n  version: 1.0\n")
    return rows


@pytest.mark.slow
def test_lm_eval_runs_local_tasks(request, tmp_path, monkeypatch):
    """Needs lm_eval (`pip install -e .[lm_eval]`), which CI does not
    install: skipped there. A multiple-choice, a generation and a rolling
    task from local JSONL go through `lm_eval.simple_evaluate` with the
    registered "mmjax" model; the scores it logs are the adapter's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    rows = _write_tasks(tmp_path, tmp_path / "data.jsonl")
    assert lm_harness.register() is lm_harness.register()
    config, workdir = request.getfixturevalue("trained")
    lm = request.getfixturevalue("lm")
    results = lm_eval.simple_evaluate(model="mmjax", model_args={"config": config, "workdir": workdir},
                                      tasks=["mmjax_tiny_choice", "mmjax_tiny_gen", "mmjax_tiny_rolling"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    scores = results["results"]
    assert 0.0 <= scores["mmjax_tiny_choice"]["acc,none"] <= 1.0
    assert 0.0 <= scores["mmjax_tiny_gen"]["exact_match,none"] <= 1.0
    assert scores["mmjax_tiny_rolling"]["word_perplexity,none"] > 0
    methods = {"mmjax_tiny_choice": lm.loglikelihood, "mmjax_tiny_gen": lm.generate_until,
               "mmjax_tiny_rolling": lm.loglikelihood_rolling}
    for task, method in methods.items():
        for sample in results["samples"][task]:
            theirs = [resp[0] for resp in sample["resps"]]
            ours = method([Request(*args) for args in sample["arguments"]])
            if task == "mmjax_tiny_choice":
                assert [c for _, c in sample["arguments"]] == [" " + c for c in rows[sample["doc_id"]]["choices"]]
                assert [bool(g) for _, g in theirs] == [g for _, g in ours]
                theirs, ours = [v for v, _ in theirs], [v for v, _ in ours]
            if task == "mmjax_tiny_gen":
                assert theirs == ours
            else:
                assert theirs == pytest.approx(ours, abs=1e-4)
