"""Rule metrics and bootstrap statistics on hand-made examples with known values."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from toushi import metrics as M
from toushi.eval.evaluate import answer_metrics, summarise
from toushi.stats import bootstrap_ci, length_controlled_ci, length_controlled_win_rate

# ------------------------------------------------------------------------------ rule metrics


def test_distinct_and_repetition_known_values():
    assert M.distinct_n("the cat the cat", 1) == 0.5  # 2 unique of 4
    assert M.distinct_n("the cat the cat", 2) == pytest.approx(2 / 3)  # (the cat) x2, (cat the)
    assert M.distinct_n("hi", 2) == 0.0
    # 8 tokens, 5 4-grams, one repeats "a b c d"
    assert M.repetition_ratio("a b c d a b c d", 4) == pytest.approx(1 / 5)
    assert M.repetition_ratio("one two three four five", 4) == 0.0
    assert M.repetition_ratio("la " * 40, 4) > 0.9


def test_markdown_lang_tokens():
    assert M.markdown_count("# Title\n- one\n- two\nsome **bold** text") == 4
    assert not M.has_markdown("Plain words, a hyphen - inside a line, and 3.5 stars.")
    assert M.has_markdown("<p>hello</p>")
    assert M.detect_lang("我今天很难过") == "zh" and M.detect_lang("I feel sad") == "en" and M.detect_lang("123") == ""
    assert M.tokens("我很难过。") == ["我", "很", "难", "过"]
    assert M.lang_match("我今天被裁员了", "抱抱你，这真的很难。") is True
    assert M.lang_match("我今天被裁员了", "That sounds so hard.") is False
    assert M.lang_match("...", "anything") is None


@pytest.mark.parametrize(
    "text, refusal",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("As an AI language model, I do not have feelings.", True),
        ("I am unable to provide support for this request.", True),
        ("抱歉，我无法提供这方面的帮助。", True),
        ("作为一个AI，我没有感情。", True),
        ("I'm so sorry to hear you lost your job. That is a lot to carry.", False),
        ("I can't imagine how hard this week has been for you.", False),
        ("听到你的遭遇我很难过，你已经很努力了。", False),
    ],
)
def test_refusal(text, refusal):
    assert M.is_refusal(text) is refusal


@pytest.mark.parametrize(
    "text, opens",
    [
        ("I'm so sorry to hear you lost your job. That is a lot to carry.", True),
        ("Oh no, I'm really sorry that happened.", True),
        ("Sorry you're going through this!", True),
        ("I apologize if this sounds blunt, but you matter.", True),
        ("抱歉听到这个消息。你已经很努力了。", True),
        ("That sounds exhausting. I'm sorry it keeps happening.", False),  # the apology is not the opening
        ("You have carried this alone for a long time.", False),
        ("听到你的遭遇我很难过，你已经很努力了。", False),
        ("", False),
    ],
)
def test_apology_open(text, opens):
    assert M.apology_open(text) is opens


def test_answer_metrics_hand_example():
    m = answer_metrics("I failed my exam and feel useless.", "**You** are not useless. You are not useless.")
    assert m["markdown"] == 1.0 and m["markdown_count"] == 1
    assert m["chars"] == len("**You** are not useless. You are not useless.")
    assert m["tokens"] == 8
    assert m["lang_match"] == 1.0 and m["empty"] == 0.0 and m["refusal"] == 0.0 and m["apology_open"] == 0.0
    assert m["distinct_1"] == pytest.approx(4 / 8)
    assert m["repetition_4"] == pytest.approx(1 / 5)  # "you are not useless" twice in 5 4-grams
    assert answer_metrics("post", "   ")["empty"] == 1.0


def test_jargon_score_separates_plain_from_pseudo_profound():
    plain = M.jargon_score("That sounds exhausting. Maybe take tonight off and text a friend.")["score"]
    drift = M.jargon_score("Your grief is a quantum superposition on the manifold of entropy, a topology of pain.")
    assert plain == 0.0 and drift["score"] > 0.3


def test_embedding_similarity_offline():
    try:
        model = M.load_embedder()
    except M.EmbeddingUnavailable as e:
        pytest.fail(f"the embed extra should be installed by `make install`: {e}")
    sims = M.embedding_similarity(
        ["I'm so sorry you lost your job.", "I'm so sorry you lost your job.", "The quarterly revenue grew 4%."],
        ["I'm so sorry you lost your job.", "Losing a job is really painful, I'm sorry.", "Losing a job hurts."],
        model,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-4)
    assert sims[1] > sims[2] + 0.2
    zh = model.encode(["我最近压力很大，晚上总是睡不着。", "最近压力好大，睡不好觉。", "今天股票涨了。"])
    assert zh.shape == (3, 384) and np.allclose(np.linalg.norm(zh, axis=1), 1.0, atol=1e-5)
    assert zh[0] @ zh[1] > zh[0] @ zh[2]
    # read with transformers alone: sentence-transformers would bring scikit-learn into every process
    assert "sentence_transformers" not in sys.modules
    with pytest.raises(ValueError, match="references"):
        M.embedding_similarity(["a"], [], model)


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        x = rng.normal(3.0, 1.0, size=n)
        ci = bootstrap_ci(x, n_boot=500, seed=0)
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
        assert ci["mean"] == pytest.approx(float(x.mean()))
        assert ci["n"] == n
        widths.append(ci["hi"] - ci["lo"])
    assert widths[0] > widths[1] > widths[2]
    # roughly the normal-theory width 2 * 1.96 / sqrt(n)
    assert widths[2] == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.25)


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert bootstrap_ci([None, float("nan"), 2.0])["n"] == 1
    ci = bootstrap_ci([0.5] * 10)
    assert ci["lo"] == ci["hi"] == 0.5


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # The system wins exactly when it is longer, and it is longer in 3 of 4 pairs: raw 0.75,
    # but at equal length it is a coin flip.
    rng = np.random.default_rng(0)
    n = 400
    len_ref = rng.integers(200, 400, size=n)
    longer = rng.random(n) < 0.75
    len_sys = np.where(longer, len_ref * rng.uniform(1.1, 2.0, n), len_ref * rng.uniform(0.5, 0.9, n))
    # a noisy length preference, so the data are not separable
    p_win = 1 / (1 + np.exp(-4 * np.log(len_sys / len_ref)))
    outcomes = (rng.random(n) < p_win).astype(float)
    raw = outcomes.mean()
    lc = length_controlled_win_rate(outcomes, len_sys, len_ref)
    assert raw > 0.6
    assert abs(lc - 0.5) < 0.1
    ci = length_controlled_ci(outcomes, len_sys, len_ref, n_boot=100)
    assert ci["lo"] <= lc <= ci["hi"]


def test_length_controlled_equals_raw_without_length_differences():
    outcomes = [1, 1, 1, 0, 0.5, 1, 0, 1, 1, 0.5]
    lens = [100] * 10
    assert length_controlled_win_rate(outcomes, lens, lens) == pytest.approx(np.mean(outcomes), abs=0.01)


def test_summarise_aggregates_per_system():
    answers = [  # eval records: one per (system, prompt), with the prompt's labels
        {"system": s, "prompt_id": f"p{i % 2}", "scene": "grief", "emotion": None, "intent": None,
         "metrics": {**answer_metrics("I feel sad", t), "embed_sim": None}}
        for i, (s, t) in enumerate([("weak", "- you ok"), ("weak", "- hang in there"), ("sft", "That sounds hard."),
                                    ("sft", "I hear you.")])
    ]
    nll = [{"system": "sft", "nll_sum": 10.0, "tokens": 5, "nll": 2.0},
           {"system": "sft", "nll_sum": 30.0, "tokens": 5, "nll": 6.0}]
    s = summarise(answers, nll, None, n_boot=50, seed=0)
    assert s["systems"] == ["weak", "sft"]
    assert s["metrics"]["weak"]["markdown"]["mean"] == 1.0
    assert s["metrics"]["sft"]["markdown"]["mean"] == 0.0
    assert s["metrics"]["sft"]["embed_sim"]["n"] == 0
    assert s["nll"]["sft"]["mean"] == 4.0 and s["nll"]["sft"]["token_mean"] == 4.0
    assert s["nll"]["sft"]["perplexity"] == pytest.approx(math.exp(4.0))
    scene = s["strata"]["facets"]["scene"]
    assert [(c["value"], c["posts"], c["few"]) for c in scene] == [("grief", 2, True)]  # 2 posts < min_posts
