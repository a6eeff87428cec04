"""The simulated seeker: parsing its 0-100 feeling, and a real vLLM engine on the offline model role-playing
two posters for three systems, one and two turns."""

from __future__ import annotations

import pytest

from toushi.calls import Calls
from toushi.corpus.tagging import label_set
from toushi.eval.simulate import (
    Responder,
    feeling_prompt,
    make_card,
    parse_feeling,
    run_seeker,
    seeker_summary,
)
from toushi.recipe import Sampling
from toushi.store import StageStore

POSTS = [
    {"id": "a", "lang": "en", "post": "My manager took credit for my project in front of the whole team today.",
     "prompt": "Write a supportive comment under this post: My manager took credit for my project.",
     "emotion": "anger", "intent": "vent_anger"},
    {"id": "b", "lang": "en", "post": "I can't sleep before my exam and I keep thinking I'll fail.",
     "prompt": "Write a supportive comment under this post: I can't sleep before my exam.",
     "emotion": None, "intent": None},
]
ANSWERS = {
    "weak": ["Stay positive!", "Just relax and sleep."],
    "guided": ["That's infuriating: it was your work and he stood up and took it.",
               "The night before an exam can feel endless. You have prepared more than your fear says."],
    "strong": ["Having your work claimed in front of everyone is a real injury; your anger makes sense.",
               None],  # no answer to this post: nothing to simulate
}


@pytest.mark.parametrize("output, expected", [
    ('{"feeling":35,"why":"Nobody gets it."}', {"feeling": 35, "why": "Nobody gets it.", "complete": True}),
    ('{"feeling": 100, "why": ""}', {"feeling": 100, "why": None, "complete": True}),
    ('{"feeling":62,"why":"It helped a bit, tho', {"feeling": 62, "why": None, "complete": False}),  # cut off
    ('{"feeling": 140, "why": "x"}', None),  # off the scale: invalid, never clipped
    ('{"feeling": "a lot", "why": "x"}', None),
    ("I feel about 40 out of 100.", None),  # no score in the asked form
    ("", None),
])
def test_parse_feeling(output, expected):
    assert parse_feeling(output) == expected


def test_cards_carry_labels_in_the_language_of_the_post():
    zh = make_card({**POSTS[0], "lang": "zh", "post": "领导当众抢了我的功劳。"}, "en", label_set("zh"))
    assert zh.emotion == "愤怒" and zh.need.startswith("想把火气发出来")
    en = make_card(POSTS[0], "en", label_set("en"))
    assert en.emotion == "anger" and "let off anger" in en.need
    prompt = feeling_prompt(en, [])
    assert "What you feel most: anger." in prompt and "nobody has replied yet" in prompt
    bare = make_card(POSTS[1], "en", label_set("en"))
    assert bare.emotion is None and "What you feel most" not in feeling_prompt(bare, [])
    assert make_card({**POSTS[0], "emotion": "nervousness"}, "en", label_set("en")).emotion == "nervousness"


@pytest.fixture(scope="module")
def engine(vllm_engine):
    return vllm_engine


def test_seeker_scores_every_system_on_the_offline_model(engine, tmp_path):
    cards = [make_card(p, "en", label_set("en")) for p in POSTS]
    store = StageStore(tmp_path, "seeker")
    sampling = Sampling(temperature=0.0, max_tokens=64)
    res = run_seeker(lambda: engine, cards, ANSWERS, store, model="smollm2", sampling=sampling)
    # constrained decoding: a score in 0..100 for the "before" of each card and for every (system, post)
    assert len(res["before"]) == 2 and all(isinstance(b, int) and 0 <= b <= 100 for b in res["before"])
    assert res["invalid_calls"] == 0 and res["calls"] == 2 + 5 and res["generated"] == 7
    items = {(it["system"], it["prompt_id"]): it for it in res["items"]}
    assert set(items) == {("weak", "a"), ("weak", "b"), ("guided", "a"), ("guided", "b"), ("strong", "a")}
    for (system, pid), it in items.items():
        assert it["valid"] and isinstance(it["after"], int) and 0 <= it["after"] <= 100, it
        assert it["before"] == res["before"][0 if pid == "a" else 1]  # one "before" per post, for every system
        assert it["delta"] == it["after"] - it["before"] and it["feelings"] == [it["after"]]
    summary = seeker_summary(res["items"], n_boot=50)
    assert set(summary) == {"weak", "guided", "strong"}
    assert all(v["delta"]["mean"] is not None and v["invalid"] == 0 for v in summary.values())
    assert summary["weak"]["valid"] == 2 and summary["strong"]["posts"] == 1

    # a rerun makes no call: every answer comes from the store
    again = run_seeker(lambda: pytest.fail("no engine needed"), cards, ANSWERS, store, model="smollm2",
                       sampling=sampling)
    assert again["generated"] == 0 and again["items"] == res["items"]

    # two turns: the seeker writes back, the system (here the same small model) replies, the seeker says how it
    # feels after each reply; its "before" is the one already cached
    class Seen:  # the engine, remembering what the system was asked
        asked: list = []

        def generate(self, convs, sampling, **kw):
            self.asked.append(convs)
            return engine.generate(convs, sampling, **kw)

    seen = Seen()
    replies = Calls(store, "smollm2", lambda: seen, Sampling(temperature=0.0, max_tokens=24), kind="seeker-respond")
    responders = {"guided": Responder(replies, lambda pid, chat: [{"role": "system", "content": "Be kind."}, *chat])}
    two = run_seeker(lambda: engine, cards[:1], {"guided": ANSWERS["guided"][:1]}, store, model="smollm2",
                     sampling=sampling, turns=2, reply_sampling=Sampling(temperature=0.7, max_tokens=24),
                     responders=responders)
    item = two["items"][0]
    assert item["valid"] and len(item["feelings"]) == 2 and all(0 <= f <= 100 for f in item["feelings"])
    assert item["feelings"][0] == items[("guided", "a")]["after"]  # the first turn is the same call as above
    assert item["before"] == res["before"][0] and item["delta"] == item["feelings"][-1] - item["before"]
    assert [t["who"] for t in item["transcript"]] == ["commenter", "you", "commenter"]
    assert two["generated"] == 3  # the seeker's message, the system's reply, the feeling after it
    sent = seen.asked[0][0]  # what the system saw: its system prompt, the task, its comment, the seeker's message
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == POSTS[0]["prompt"] and sent[3]["content"] == item["transcript"][1]["text"]
    with pytest.raises(ValueError, match="responder"):
        run_seeker(lambda: engine, cards, ANSWERS, store, model="smollm2", sampling=sampling, turns=2)
