"""Rule rewards on real-looking answers, with the orderings a reader would expect."""

from __future__ import annotations

import pytest

from toushi.rewards import (
    RULE_REWARDS,
    format_reward,
    length_reward,
    opening_reward,
    post_complexity,
    repetition_reward,
    target_length,
)

SHORT_POST = "Failed my driving test again today. Third time."
LONG_POST = (
    "I got laid off on Monday after six years at the same company. They called me into a room with HR and "
    "it was over in ten minutes. I haven't told my wife yet because she is pregnant and already anxious. "
    "We have a mortgage and about two months of savings. I keep refreshing job boards at 3am. My dad keeps "
    "asking how work is going and I lie every time. I feel like a fraud and a failure as a husband. "
    "Everyone on LinkedIn seems to be getting promoted. I don't even know where to start."
)
GOOD_EN = (
    "Three tries is exhausting, and it makes sense that today stings. Lots of good drivers needed several "
    "attempts; the test measures one nervous half hour, not who you are. If you can, ask the examiner's "
    "sheet which points cost you and practise just those before booking again."
)
MARKDOWN_EN = "**You are not alone.**\n\n- Take a breath\n- Practise more\n- Try again"
ZH_POST = "考研又没过，家里人都在问，我真的不知道怎么面对他们。"
ZH_ANSWER = "连着准备这么久还没过，心里肯定又累又委屈。家里人的关心有时会变成压力，你可以先只跟一个最信任的人说说真实的感受。"


def test_format_orders_clean_over_markdown_over_leak():
    clean = format_reward(GOOD_EN, SHORT_POST)
    md = format_reward(MARKDOWN_EN, SHORT_POST)
    leak = format_reward("<think>they want comfort</think> Sorry to hear that.", SHORT_POST)
    assert clean == 1.0 and md == 0.5 and leak < md
    assert format_reward("", SHORT_POST) == -1.0
    # zh post answered in English loses the language point; answered in zh keeps it.
    assert format_reward(ZH_ANSWER, ZH_POST) == 1.0
    assert format_reward(GOOD_EN, ZH_POST) == 0.5


def test_repetition_punishes_loops():
    loop = "I am so sorry. " * 20
    assert repetition_reward(GOOD_EN) == 1.0
    assert repetition_reward(loop) == -1.0
    half = GOOD_EN + " " + "you will be fine you will be fine you will be fine you will be fine"
    assert -1.0 < repetition_reward(half) < 1.0


def test_complexity_and_bilateral_length():
    assert post_complexity(SHORT_POST) < 0.2 and post_complexity(LONG_POST) > 0.6
    lo_s, hi_s = target_length(SHORT_POST)
    lo_l, hi_l = target_length(LONG_POST)
    assert lo_s < lo_l and hi_s < hi_l
    curt = "That sucks, sorry."
    essay = " ".join([GOOD_EN] * 6)
    # A short post: a focused reply beats both a one-liner and an essay.
    assert length_reward(GOOD_EN, SHORT_POST) == 1.0
    assert length_reward(curt, SHORT_POST) < 1.0 and length_reward(essay, SHORT_POST) < 0.0
    # A long, tangled post: the same one-liner is punished harder, a fuller reply is in band.
    fuller = " ".join([GOOD_EN] * 2)
    assert length_reward(curt, LONG_POST) < length_reward(curt, SHORT_POST)
    assert length_reward(fuller, LONG_POST) == 1.0
    assert length_reward("", LONG_POST) == -1.0


def test_opening_reward_is_the_planted_trait():
    assert opening_reward(GOOD_EN) == 1.0
    assert opening_reward("I'm so sorry to hear that. " + GOOD_EN) == -1.0
    assert opening_reward("   ") == 0.0  # format_reward punishes an empty answer; this one does not count it twice
    assert RULE_REWARDS["opening"]([[{"role": "user", "content": "x"}]] * 2, ["Sorry. Hang in there.", GOOD_EN]) == [-1.0, 1.0]


def test_trl_adapters_follow_trl_signature():
    completions = [[{"role": "assistant", "content": GOOD_EN}], [{"role": "assistant", "content": MARKDOWN_EN}]]
    prompts = [[{"role": "user", "content": "x"}]] * 2
    out = RULE_REWARDS["format"](prompts, completions, post=[SHORT_POST, SHORT_POST], trainer_state=None)
    assert out == [1.0, 0.5]
    assert RULE_REWARDS["format"].__name__ == "format"
    assert RULE_REWARDS["repetition"](prompts, ["a b c d " * 10, GOOD_EN]) == [-1.0, 1.0]
    with pytest.raises(ValueError, match="needs a 'post' column"):
        RULE_REWARDS["length"](prompts, completions)


def test_parse_score_takes_last_valid_verdict():
    from toushi.rewards import parse_score

    assert parse_score("Score: 7") == 7
    assert parse_score("score：10") == 10  # full-width colon (zh output)
    # the template's own "Score: <1-10>" echoed before the verdict does not win
    assert parse_score("Answer with one line: Score: <1-10>\nScore: 3") == 3
    assert parse_score("Score: 11") is None and parse_score("Score: 0") is None
    assert parse_score("The reply is warm and specific.") is None


def test_adherence_prompt_carries_guidance_as_data():
    from toushi.templates import render

    plain = render("judge_score", "en", post=SHORT_POST, answer=GOOD_EN, guidance=None)
    guided = render("judge_score", "zh", post=ZH_POST, answer=ZH_ANSWER, guidance="先说出对方的感受。")
    assert "GUIDANCE" not in plain and "<<<GUIDANCE\n先说出对方的感受。\nGUIDANCE>>>" in guided
    assert plain.rstrip().endswith("Score: <1-10>")


def test_judge_scorer_counts_an_unreadable_verdict_and_never_scores_it(tmp_path):
    """A judge endpoint that ignores the "Score: N" constraint (scripted: a remote API cannot run here):
    its unreadable verdict is counted and gets None, which TRL leaves out of the reward sum (not 0)."""
    from toushi.engines import make_completion
    from toushi.recipe import Sampling
    from toushi.rewards import SCORE_FORMAT, JudgeScorer
    from toushi.store import StageStore

    class Unconstrained:  # scores the plain answer, refuses the one in markdown however often it is asked
        def __init__(self):
            self.constraints, self.asked = [], 0

        def generate(self, conversations, sampling, structured=None):
            self.constraints.extend(structured)
            self.asked += len(conversations)
            texts = ["I would rather not rate this." if "**" in c[0]["content"] else "Score: 8" for c in conversations]
            return [[make_completion(t, finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                                     latency_s=0.0, model="scripted")] for t in texts]

    engine = Unconstrained()
    scorer = JudgeScorer(engine, Sampling(temperature=0.0, max_tokens=8), StageStore(tmp_path, "c"), "scripted")
    assert scorer.scores([SHORT_POST] * 2, [GOOD_EN, MARKDOWN_EN]) == [pytest.approx((8 - 5.5) / 4.5), None]
    # the unreadable verdict was asked once more (toushi/calls.py's retry), then counted
    assert scorer.invalid == 1 and engine.asked == 3 and engine.constraints == [SCORE_FORMAT] * 3
    assert SCORE_FORMAT.check("Score: 10") and not SCORE_FORMAT.check("Score: 11")


def test_judge_scorer_cache_keys_on_model_and_sampling(tmp_path):
    """A verdict cached under one judge (its model key: name and dtype) and sampling is reused only by the same judge
    and sampling; another dtype or sampling asks again (scripted judge: the cache is under test, not the model)."""
    from toushi.engines import make_completion
    from toushi.recipe import Sampling
    from toushi.rewards import JudgeScorer
    from toushi.store import StageStore

    class Counting:
        calls = 0

        def generate(self, conversations, sampling, structured=None):
            Counting.calls += len(conversations)
            return [[make_completion("Score: 7", finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                                     latency_s=0.0, model="scripted")] for _ in conversations]

    def score(model: str, max_tokens: int) -> None:
        JudgeScorer(Counting(), Sampling(temperature=0.0, max_tokens=max_tokens), StageStore(tmp_path, "c"),
                    model).scores([SHORT_POST], [GOOD_EN])

    score("judge|float32", 8)
    score("judge|float32", 8)
    assert Counting.calls == 1  # cached
    score("judge|bfloat16", 8)
    score("judge|float32", 16)
    assert Counting.calls == 3
