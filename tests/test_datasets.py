"""SFT / DPO training sets from pairs (+ guided) records in the contract shape.

`write_run` builds a small real run (pairs + guided records) that test_train.py and test_export.py
reuse, so training tests do not depend on the pairs stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toushi.datasets import DatasetError, build_dpo, build_sft, load_dpo, load_sft, target_text
from toushi.store import StageStore

GUIDANCE = "GUIDANCE: name the feeling first, then stay with the person; plain text, no lists."

# (post, strong answer, weak answer, guided answer)
POSTS = [
    ("I failed my driving test again today.", "That sounds really discouraging, especially after all the practice "
     "you put in. Failing twice does not mean you can't drive; it means the test caught you on a bad day.",
     "Just try again.", "Failing again stings. You clearly care about this, and that effort will carry you."),
    ("My best friend forgot my birthday.", "Ouch, that hurts, especially from someone who matters this much. It is "
     "okay to feel let down, and it might help to tell them gently how it landed.",
     "Maybe they were busy.", "Feeling forgotten by a close friend hurts. Your disappointment makes sense."),
    ("I can't sleep because of work stress.", "Lying awake with your mind racing about work is exhausting. You "
     "deserve rest, and it might help to write tomorrow's worries down before bed so they wait for morning.",
     "Drink some tea.", "Work stress that follows you to bed is draining. You deserve a quiet mind at night."),
    ("My dog died this morning.", "I am so sorry. Losing a dog is losing family, and the house must feel so quiet "
     "right now. Your grief shows how much love you gave each other.",
     "Get a new dog.", "I'm so sorry about your dog. That kind of loss leaves a big empty space."),
    ("Nobody replied to my message in the group chat.", "Being left on read in a group can feel lonely, like you "
     "are invisible. It often says more about how busy people are than about you.",
     "Whatever.", "Silence after you reach out can feel lonely. It likely isn't about you."),
    ("I got rejected from my dream job.", "That is a hard blow after hoping for so long. Feeling crushed is fair, "
     "and it does not erase the skills that got you to that interview.",
     "There are other jobs.", "Losing a dream job hurts. Your hope was real and so is your ability."),
    ("My parents keep comparing me to my cousin.", "Being measured against someone else over and over wears you "
     "down. You are your own person, and your path does not need to look like theirs.",
     "Cousins are annoying.", "Constant comparison is tiring. You deserve to be seen for who you are."),
    ("I feel like I have no friends at my new school.", "Starting somewhere new and feeling alone is really hard. "
     "Friendships take time, and the loneliness you feel now will not be forever.",
     "Join a club.", "Feeling alone at a new school is hard. It takes time, and you are not doing it wrong."),
    ("I messed up a presentation in front of everyone.", "That sinking feeling after a presentation goes wrong is "
     "awful. Most people remember far less of it than you do, and one rough talk does not define you.",
     "Nobody cares.", "A rough presentation feels huge right after. It doesn't define you."),
    ("My partner and I keep fighting about money.", "Money fights can make everything feel tense at home. It "
     "sounds like you both care about security, and maybe talking about that shared worry could help.",
     "Get a budget app.", "Money fights wear a couple down. You both seem to want to feel safe."),
    ("I'm scared about my exam results tomorrow.", "Waiting for results is its own kind of stress. Whatever the "
     "number says tomorrow, it will not measure how hard you worked or who you are.",
     "It is what it is.", "The waiting is the worst part. Whatever comes, you are more than a grade."),
    ("My sister moved abroad and I miss her.", "Missing a sister who is far away leaves a real ache. It shows how "
     "close you are, and those calls and messages can keep that bond alive.",
     "Visit her.", "Missing your sister shows how close you are. That distance is hard."),
    ("I feel stuck in my life right now.", "Feeling stuck is heavy, like the days blur together. It is okay not to "
     "have the next step figured out; noticing that you want change is already a start.",
     "Do something new.", "Feeling stuck is heavy. Wanting change is already a first step."),
    ("My coworker took credit for my idea.", "That is so frustrating, watching someone else get praised for your "
     "work. Your anger makes sense, and your idea was still yours.",
     "Happens all the time.", "Having your idea taken is infuriating. Your anger makes sense."),
    ("I've been feeling really lonely lately.", "Loneliness can sit on you quietly for a long time. Thank you for "
     "saying it out loud here; reaching out like this matters.",
     "Go outside more.", "Loneliness is heavy to carry. Saying it out loud matters."),
    ("My grandmother is in the hospital.", "Having your grandmother in the hospital is frightening. It makes sense "
     "to feel worried, and I hope you get to be near her and take care of yourself too.",
     "Hospitals are good.", "It's frightening when someone you love is in hospital. Take care of yourself too."),
]
HELDOUT = {3, 9, 14}  # indices held out for eval


def completion(text: str, flags: list[str] | None = None, reasoning: str | None = None) -> dict:
    return {"text": text, "reasoning": reasoning, "finish_reason": "stop", "prompt_tokens": 20,
            "completion_tokens": 30, "latency_s": 0.1, "model": "test", "flags": flags or []}


def make_records() -> tuple[list[dict], list[dict]]:
    pairs, guided = [], []
    for i, (post, strong, weak, guided_ans) in enumerate(POSTS):
        rid = f"p{i:02d}"
        split = "heldout" if i in HELDOUT else "train"
        prompt = f"Write one reply to this post:\n{post}"
        base = {"id": rid, "lang": "en", "scene": "life", "split": split, "post": post, "prompt": prompt}
        pairs.append({**base, "weak": [completion(weak)],
                      "strong": [completion(strong, reasoning="The poster is hurting; validate first.")]})
        guided.append({**base, "system": GUIDANCE, "guided": [completion(guided_ans)]})
    # flagged answers that must be dropped and counted
    pairs[0]["strong"][0]["flags"] = ["markdown"]
    pairs[1]["strong"][0] = completion("", flags=["empty"])
    guided[2]["guided"][0]["flags"] = ["unterminated_think"]
    return pairs, guided


def write_run(run_dir: Path) -> Path:
    """A run directory with pairs + guided records (13 train prompts, 3 held out)."""
    pairs, guided = make_records()
    for name, recs in (("pairs", pairs), ("guided", guided)):
        with StageStore(run_dir, name).writer() as w:
            w.write_many(recs)
    return run_dir


def test_sft_strong_excludes_heldout_and_counts_drops():
    pairs, guided = make_records()
    examples, counts = build_sft(pairs, guided, target="strong")
    assert counts["heldout_excluded"] == 3
    assert counts["dropped"] == {"strong_markdown": 1, "strong_empty": 1}
    assert len(examples) == 16 - 3 - 2 == counts["examples"]
    heldout_prompts = {p["prompt"] for p in pairs if p["split"] == "heldout"}
    assert not any(e["messages"][0]["content"] in heldout_prompts for e in examples)
    for e in examples:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"]
        assert "<think>" not in e["messages"][-1]["content"]


def test_keep_think_puts_reasoning_in_target_only_when_asked():
    pairs, guided = make_records()
    plain, _ = build_sft(pairs, guided, target="strong")
    think, _ = build_sft(pairs, guided, target="strong", keep_think=True)
    assert all("<think>" not in e["messages"][-1]["content"] for e in plain)
    assert all(e["messages"][-1]["content"].startswith("<think>\n") for e in think)
    # a stray think block inside the answer text never reaches a target
    assert target_text(completion("<think>hmm</think>\nHello there.")) == "Hello there."


def test_context_distillation_has_no_guidance_in_prompts():
    pairs, guided = make_records()
    examples, counts = build_sft(pairs, guided, target="guided", context_distillation=True)
    assert len(examples) == 16 - 3 - 1 and counts["dropped"] == {"guided_truncated": 1}
    for e in examples:
        assert all(m["role"] != "system" for m in e["messages"])
        assert all(GUIDANCE not in m["content"] for m in e["messages"])
    # without distillation the guidance stays as the system prompt
    with_guidance, _ = build_sft(pairs, guided, target="guided", context_distillation=False)
    assert all(e["messages"][0] == {"role": "system", "content": GUIDANCE} for e in with_guidance)


def test_sft_both_targets():
    pairs, guided = make_records()
    examples, _ = build_sft(pairs, guided, target="both")
    assert {e["source"] for e in examples} == {"strong", "guided"}
    assert len(examples) == 11 + 12
    assert len({e["id"] for e in examples}) == len(examples)


def test_dpo_pairs_and_guided_pairs():
    pairs, guided = make_records()
    examples, counts = build_dpo(pairs, guided)
    assert counts["by_kind"] == {"strong>weak": 11}
    assert counts["dropped"] == {"strong>weak_chosen_strong_markdown": 1, "strong>weak_chosen_strong_empty": 1}
    e = examples[0]
    assert e["prompt"][0]["role"] == "user" and e["chosen"][0]["role"] == "assistant"
    assert e["chosen"][0]["content"] != e["rejected"][0]["content"]
    _, counts = build_dpo(pairs, guided, guided_pairs=True)
    assert counts["by_kind"] == {"strong>weak": 11, "strong>guided": 11, "guided>weak": 12}


def test_drop_markdown_off_keeps_markdown_answers():
    pairs, guided = make_records()
    _, counts = build_sft(pairs, guided, target="strong", drop_markdown=False)
    assert counts["examples"] == 12 and counts["dropped"] == {"strong_empty": 1}


def test_load_from_run_and_empty_error(tmp_path):
    run = write_run(tmp_path / "run")
    sft, _ = load_sft(run)
    dpo, _ = load_dpo(run, guided_pairs=True)
    assert len(sft) == 11 and len(dpo) == 34
    # every train answer flagged -> a clear error with the counts
    pairs, _ = make_records()
    for p in pairs:
        p["strong"][0]["flags"] = ["markdown"]
    empty = tmp_path / "empty"
    with StageStore(empty, "pairs").writer() as w:
        w.write_many(pairs)
    with pytest.raises(DatasetError, match=r"empty after filtering: 16 prompts, 3 held out.*strong_markdown"):
        load_sft(empty)
    with pytest.raises(DatasetError, match="guided stage"):
        load_sft(empty, target="guided")


def test_truncated_answers_are_never_targets(tiny_model):
    """A real engine call cut off at max_tokens comes back flagged; records carrying such answers (and one
    written before the flag existed: finish_reason "length" only) go through the real builders of every
    target: SFT, DPO chosen, guidance contrasts, guided examples, distillation's strong reasoning."""
    from toushi.datasets import pairs_reasoning
    from toushi.engines import flag_counts, is_truncated, make_engine
    from toushi.guidance import build_pairs
    from toushi.guided import guided_systems
    from toushi.recipe import ModelSpec, Sampling

    with make_engine(ModelSpec(name=str(tiny_model), engine="hf", dtype="float32")) as engine:
        (cut,), = engine.generate([[{"role": "user", "content": POSTS[0][0]}]], Sampling(temperature=0.0, max_tokens=3))
    assert cut.finish_reason == "length" and "truncated" in cut.flags and cut.completion_tokens == 3
    # the engine's own record, with a text that reads like a reply cut mid-sentence (the random-weight model's
    # three tokens may decode to nothing: its text's own flags, such as "empty", go with it)
    real = {**cut.to_dict(), "text": "That sounds really hard, and I", "reasoning": "They need", "flags": ["truncated"]}
    old = {**completion("It hurts to be left out like that, and you"), "finish_reason": "length"}
    assert is_truncated(real) and is_truncated(old) and not is_truncated(completion("Fine."))

    pairs, guided = make_records()
    by = {r["id"]: r for r in pairs}
    by["p04"]["strong"] = [real]                 # train: a cut-off strong answer
    by["p07"]["strong"] = [old]                  # train: the same, from before the flag
    guided[5]["guided"] = [real]                 # train: a cut-off guided answer
    by["p06"]["weak"] = [real]                   # train: a cut-off weak answer may stay a rejected one
    cut_texts = {real["text"], old["text"]}

    sft, counts = build_sft(pairs, guided, target="both")
    assert not {e["messages"][-1]["content"] for e in sft} & cut_texts
    # p04, p07 strong; p05 guided and p02's unterminated guided answer; all counted as truncated
    assert counts["dropped"] == {"strong_markdown": 1, "strong_empty": 1, "strong_truncated": 2, "guided_truncated": 2}

    dpo, counts = build_dpo(pairs, guided, guided_pairs=True)
    assert not {e["chosen"][0]["content"] for e in dpo} & cut_texts
    assert counts["dropped"]["strong>weak_chosen_strong_truncated"] == 2
    rejected = [e for e in dpo if e["rejected"][0]["content"] == real["text"]]
    # p05's guided answer under strong; p06's weak answer under strong and under guided
    assert [e["kind"] for e in rejected] == ["strong>guided", "strong>weak", "guided>weak"]

    contrasts, skipped = build_pairs(pairs, blind=False, seed=0)
    assert {"p04", "p06", "p07"}.isdisjoint(p["id"] for p in contrasts) and skipped == 4  # + p01's empty one
    assert not {a["text"] for p in contrasts for a in p["answers"]} & cut_texts

    train = [p for p in pairs if p["split"] == "train"]
    systems = guided_systems(train, pairs, "Be kind.", k=3, lang="en")
    used = {i for ex_ids, _ in systems for i in ex_ids}
    assert used and used.isdisjoint({"p00", "p01", "p04", "p07"})  # flagged or cut-off strong answers
    assert all(text not in system for _, system in systems for text in cut_texts)

    assert pairs_reasoning(by["p04"]) is None and pairs_reasoning(by["p08"]) == "The poster is hurting; validate first."

    # what the pairs and guided manifests count: the old record too, though its flags never said so
    assert flag_counts([real, old, completion("Fine.")], "strong")["strong_truncated"] == 2


def test_split_eval_keeps_each_post_on_one_side():
    from toushi.training import split_eval

    pairs, guided = make_records()
    examples, _ = build_sft(pairs, guided, target="both")  # most posts give two examples: strong and guided
    train, held = split_eval(examples, 0.3, seed=0)
    assert held and len(train) + len(held) == len(examples)
    assert not {e["prompt_id"] for e in train} & {e["prompt_id"] for e in held}
    assert len({e["prompt_id"] for e in held}) == round(13 * 0.3)  # a share of the posts, not of the examples
    assert split_eval(examples, 0.3, seed=0) == (train, held)
