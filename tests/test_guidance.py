"""Guidance extraction: rule memory operations, packing against the real tokenizer, the drift guard, the
acceptance gate's decision, the repair path, human edits, and every mode end to end on the offline model
(structure, provenance, intermediates, flags, resume after a kill)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from toushi.calls import Calls
from toushi.eval.judge import rubric
from toushi.guidance import build_pairs, load_guidance, run_stage
from toushi.guidance import modes as M
from toushi.guidance.drift import best_round, score
from toushi.guidance.gate import both_orders, decide
from toushi.guidance.memory import Memory, parse_ops
from toushi.guidance.packing import pack, shrink_pair, token_counter
from toushi.guidance.render import parse_markdown, read_guidance_file, to_markdown
from toushi.guidance.session import Session
from toushi.recipe import Sampling, load_recipe
from toushi.runner import StageContext
from toushi.stages import declared_view
from toushi.store import StageStore

REPO = Path(__file__).resolve().parent.parent
ALIASES = {"p1": "id-1", "p2": "id-2", "p3": "id-3", "p4": "id-4"}


# --------------------------------------------------------------------------------- rule memory


def test_parse_ops_reads_decorated_lines_and_counts_malformed():
    out = """Sure! Here are the operations:
1. DIM Validation: Name the feeling before anything else.
- **ADD** D1: Reflect the exact feeling the poster names [p1, p3]
ADD Practical help: Offer one small next step they can take today (pairs: p2)
GOOD D1: "It sounds exhausting to carry that alone" [p1]
EDIT R1.1 no colon so no new text
AGREE the first rule
REMOVE R2.1
That is all."""
    r = parse_ops(out)
    assert [o.kind for o in r.ops] == ["DIM", "ADD", "ADD", "GOOD", "REMOVE"]
    assert r.ops[1].target == "D1" and r.ops[1].pairs == ["p1", "p3"]
    assert r.ops[1].text == "Reflect the exact feeling the poster names"
    assert r.ops[2].text == "Offer one small next step they can take today"
    assert r.ops[3].text == "It sounds exhausting to carry that alone"
    assert r.malformed == ["EDIT R1.1 no colon so no new text", "AGREE the first rule"]
    assert not parse_ops("I think the strong replies are warmer and more specific.").structured
    # the format example copied verbatim (placeholders) is malformed, never a rule
    copied = parse_ops("DIM <dimension name>: <one-sentence definition>\nADD D1: <rule, one sentence> [p1]\n"
                       "ADD D1: <规则，一句话>\nADD D1: Thank them for sharing [p2]")
    assert [o.text for o in copied.ops] == ["Thank them for sharing"] and len(copied.malformed) == 3


def test_ops_update_support_and_provenance():
    mem = Memory(cap=6)
    first = parse_ops("DIM Validation: Name the feeling.\nADD D1: Reflect the feeling [p1]\n"
                      "ADD D1: Avoid 'at least' [p2, p9]\nADD Practical help: One small next step [p3]")
    st = mem.apply(first.ops, ALIASES)
    assert st.applied == 4 and st.unknown_pairs == 1  # p9 was never shown: dropped, counted
    assert [r.support for r in mem.dimensions[0].rules] == [2, 2]  # ADD sets 2
    assert mem.dimensions[0].rules[1].pair_ids == ["id-2"]
    # AGREE and EDIT raise support, REMOVE lowers it; references use the numbering the model was shown
    second = parse_ops("AGREE R1.1 [p4]\nEDIT R2.1: Offer one small step they can take today [p2]\n"
                       "REMOVE R1.2\nREMOVE R1.2\nAGREE R7.1\nADD D1: Ask nothing of them")
    st = mem.apply(second.ops, ALIASES)
    assert st.malformed == 1  # R7.1 does not exist
    assert st.removed == 1  # R1.2 reached 0 and went
    v = mem.dimensions[0]
    assert [(r.text, r.support) for r in v.rules] == [("Reflect the feeling", 3), ("Ask nothing of them", 2)]
    assert v.rules[0].pair_ids == ["id-1", "id-4"]
    assert mem.dimensions[1].rules[0].text == "Offer one small step they can take today"
    assert mem.dimensions[1].rules[0].support == 3 and mem.dimensions[1].rules[0].pair_ids == ["id-3", "id-2"]


def test_ops_schema_binds_labels_and_rule_ids_and_json_answer_applies(offline_model):
    import jsonschema
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from toushi.guidance.structured import EXAMPLE_SCHEMA, max_chars, ops_schema, parse_json_ops

    empty = Memory(cap=4, max_dimensions=5)
    first = ops_schema(empty, ["p1", "p2"], max_dimensions=5, cap=4, max_tokens=4096)
    assert set(first["properties"]) == {"new_dimensions"}  # nothing shown to agree with, edit or remove
    assert first["properties"]["new_dimensions"]["minItems"] == 3  # a first analysis names >= 3 dimensions
    answer = {"new_dimensions": [
        {"name": "Validation", "definition": "Name the feeling first.",
         "rules": [{"rule": "Reflect the exact feeling the poster names", "pairs": ["p1"]},
                   {"rule": "Reflect the exact  feeling the poster names", "pairs": ["p2"]}]},
        {"name": "Next step", "definition": "One small doable action.",
         "rules": [{"rule": "Offer one small step they can take today", "pairs": ["p2"]}]},
        {"name": "Warmth", "definition": "Sound like a person who cares.",
         "rules": [{"rule": "Avoid platitudes such as everything happens", "pairs": ["p1", "p2"]}]}]}
    jsonschema.validate(answer, first)
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    assert not has_xgrammar_unsupported_json_features(first)  # vLLM's xgrammar backend takes it
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(offline_model)))
    compiler.compile_json_schema(json.dumps(first), any_whitespace=False)  # and compiles it (as vLLM will)
    compiler.compile_json_schema(json.dumps(EXAMPLE_SCHEMA), any_whitespace=False)
    with pytest.raises(jsonschema.ValidationError):  # a label the call never showed is not in the enum
        jsonschema.validate({"new_dimensions": [{**answer["new_dimensions"][0], "rules": [
            {"rule": "Reflect the exact feeling the poster names", "pairs": ["p9"]}]}] * 3}, first)
    parsed = parse_json_ops(json.dumps(answer))
    mem = empty.copy()
    st = mem.apply(parsed.ops, ALIASES)
    # one lesson is one ADD: the reworded repeat in the same answer adds neither a rule nor support
    assert [len(d.rules) for d in mem.dimensions] == [1, 1, 1] and st.duplicates == 1 and st.malformed == 0
    assert mem.dimensions[0].rules[0].support == 2 and mem.dimensions[0].rules[0].pair_ids == ["id-1"]
    later = ops_schema(mem, ["p3"], max_dimensions=5, cap=4, max_tokens=4096)
    assert later["properties"]["new_dimensions"]["maxItems"] == 2  # room left under max_dimensions
    assert later["properties"]["agree"]["items"]["properties"]["rule"]["enum"] == ["R1.1", "R2.1", "R3.1"]
    assert later["properties"]["add_rules"]["items"]["properties"]["dimension"]["enum"] == [
        "Validation", "Next step", "Warmth"]
    st = mem.apply(parse_json_ops(json.dumps({"new_dimensions": [], "add_rules": [], "edit": [], "remove": [],
                                              "agree": [{"rule": "R2.1", "pairs": ["p3"]}]})).ops, ALIASES)
    assert mem.dimensions[1].rules[0].support == 3 and mem.dimensions[1].rules[0].pair_ids == ["id-2", "id-3"]
    compiler.compile_json_schema(json.dumps(later), any_whitespace=False)
    small = ops_schema(mem, ["p3"], max_dimensions=5, cap=4, max_tokens=700)
    assert max_chars(small) <= 700 < max_chars(later)  # a token a character: even degenerate text ends in time
    consolidate = ops_schema(mem, [], max_dimensions=5, cap=4)  # no pairs shown: no pair fields at all
    assert "pairs" not in consolidate["properties"]["agree"]["items"]["properties"]
    assert parse_json_ops("DIM Warmth: be kind") is None  # not JSON: read as operation lines instead
    assert parse_json_ops('{"agree": [{"pairs": ["p1"]}]}').malformed  # an entry without its rule id


def test_seeded_first_schema_forces_distinct_dimensions_with_rules(offline_model):
    """With seeds, an empty memory's answer must hold rules for every seed dimension (keyed, so distinct);
    seeds are not asked again once the memory has dimensions, and an unknown seed key is malformed."""
    import jsonschema
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from toushi.guidance.structured import ops_schema, parse_json_ops

    seeds = {d["name"]: d["definition"] for d in rubric("en")[:3]}
    empty = Memory(cap=4, max_dimensions=4)
    first = ops_schema(empty, ["p1", "p2"], max_dimensions=4, cap=4, seeds=seeds)
    assert first["properties"]["rubric_rules"]["required"] == list(seeds)
    assert first["properties"]["new_dimensions"]["minItems"] == 0
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(offline_model)))
    compiler.compile_json_schema(json.dumps(first), any_whitespace=False)
    rule = {"rule": "Say back the feeling the poster names", "pairs": ["p1"]}
    with pytest.raises(jsonschema.ValidationError):  # a seed left without a rule
        jsonschema.validate({"new_dimensions": [], "rubric_rules": {n: [rule] for n in list(seeds)[:2]}}, first)
    answer = {"new_dimensions": [], "rubric_rules": {n: [{**rule, "rule": f"{rule['rule']}, {w}"}]
                                                     for w, n in zip(("gently", "plainly", "kindly"), seeds)}}
    jsonschema.validate(answer, first)
    with pytest.raises(jsonschema.ValidationError):  # strings hold words: no digit runs, no copied JSON
        jsonschema.validate({**answer, "new_dimensions": [{"name": "p1_2_3_4", "definition": "p1_2_3_4_5_6_7_8",
                                                           "rules": [rule]}]}, first)
    mem = empty.copy()
    mem.apply(parse_json_ops(json.dumps(answer), seeds).ops, ALIASES)
    assert [d.name for d in mem.dimensions] == list(seeds) and all(len(d.rules) == 1 for d in mem.dimensions)
    assert mem.dimensions[0].definition == seeds[list(seeds)[0]]
    assert "rubric_rules" not in ops_schema(mem, ["p3"], max_dimensions=4, cap=4, seeds=seeds)["properties"]
    assert parse_json_ops(json.dumps({"rubric_rules": {"Made up": [rule]}}), seeds).malformed


def test_merged_partials_keep_at_most_max_dimensions():
    """Partial analyses merged in map-reduce can bring more dimensions than the cap; prune keeps the
    best-supported ones (the tiny-cpu run once ended with 15 of a cap of 5)."""
    merged = Memory(cap=4, max_dimensions=2)
    for calls in (["ADD Warmth: say you are sorry", "AGREE R1.1"], ["ADD Next step: offer one small step"],
                  ["ADD Validation: name the feeling", "AGREE R1.1", "AGREE R1.1"]):
        part = Memory(cap=4, max_dimensions=2)
        for text in calls:  # one analysis call each: agreement in a later call adds support
            part.apply(parse_ops(text).ops, ALIASES)
        merged.merge(part)
    support = {d.name: sum(r.support for r in d.rules) for d in merged.dimensions}
    assert len(support) == 3 and support["Validation"] > support["Warmth"] > support["Next step"], support
    assert merged.prune() == 1  # the one rule of the dropped dimension
    assert [d.name for d in merged.dimensions] == ["Warmth", "Validation"]
    merged.keep_raw("free text", "map-9", ["id-1"])  # the raw-notes log does not count against the cap
    assert [d.name for d in merged.dimensions] == ["Warmth", "Validation", "Unstructured notes"]


def test_cap_prunes_lowest_support_newest_first():
    mem = Memory(cap=2)
    mem.apply(parse_ops("ADD Warmth: rule a\nADD Warmth: rule b").ops, ALIASES)
    mem.apply(parse_ops("AGREE R1.2\nADD Warmth: rule c\nADD Warmth: rule d").ops, ALIASES)
    assert [(r.text, r.support) for r in mem.dimensions[0].rules] == [("rule a", 2), ("rule b", 3)]
    # a repeated ADD is agreement, not a duplicate
    st = mem.apply(parse_ops("ADD Warmth: Rule A").ops, ALIASES)
    assert st.pruned == 0 and mem.dimensions[0].rules[0].support == 3
    # the dimension cap refuses new dimensions (counted as malformed), existing ones still take rules
    small = Memory(cap=3, max_dimensions=1)
    st = small.apply(parse_ops("ADD One: a\nADD Two: b\nADD D1: c").ops, ALIASES)
    assert st.malformed == 1 and [d.name for d in small.dimensions] == ["One"] and small.n_rules() == 2
    # raw (unstructured) notes are a review log, outside the prompt: the cap keeps every one of them
    for i in range(5):
        small.keep_raw(f"free text {i}", f"map-{i}", ["id-1"])
    raw = small.find("Unstructured notes")
    assert raw is not None and [r.flags[1] for r in raw.rules] == [f"map-{i}" for i in range(5)]


def test_markdown_round_trip_and_hand_edit_file(tmp_path):
    mem = Memory(cap=6)
    mem.apply(parse_ops('DIM Validation: Name the feeling.\nADD D1: Reflect the feeling [p1, p2]\n'
                        'GOOD D1: "that sounds so heavy" [p1]').ops, ALIASES)
    md = to_markdown(mem, {"mode": "refine", "version": 3, "pairs": 4})
    back = parse_markdown(md)
    assert back.to_dict()["dimensions"][0]["rules"] == mem.to_dict()["dimensions"][0]["rules"]
    assert back.dimensions[0].definition == "Name the feeling."
    assert back.dimensions[0].examples[0]["pair_ids"] == ["id-1"]
    edited = tmp_path / "edited.md"
    edited.write_text(md + "\n## Pacing\nKeep it short.\n- Two or three sentences are enough\n", encoding="utf-8")
    text = load_guidance(edited)
    assert "Two or three sentences are enough" in text and "Reflect the feeling" in text
    bad = tmp_path / "bad.md"
    bad.write_text("just some notes\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no dimensions"):
        read_guidance_file(bad)


# --------------------------------------------------------------------------------- drift, gate, packing


def test_drift_scores_pseudo_profound_high_and_practical_low():
    round20 = ("情绪的量子波函数在拓扑流形上坍缩，热力学熵增驱动共情曲率的非线性演化，支持者需在希尔伯特空间中构造本征态，"
               "使情感张量 E = ∑ψ·∇S 收敛于奇点。")
    round20_en = ("The emotional wave function collapses onto a topological manifold of empathy; the thermodynamic "
                  "entropy of support measures its curvature, so S = k log W of the quantum self.")
    plain_zh = "先说出对方提到的感受，再给建议。给一个今天就能做的小步骤，比如给朋友发条消息。回复要简短、温暖。"
    plain_en = ("Name the feeling the person describes before giving any advice. Offer one small step they could "
                "try today, like texting a friend. Keep the reply short and warm.")
    for bad in (round20, round20_en):
        assert score(bad)["score"] > 0.5 and score(bad)["terms"]
    for good in (plain_zh, plain_en):
        assert score(good)["score"] < 0.1
    rounds = [{"score": 0.05, "accepted": True}, {"score": 0.1, "accepted": True},
              {"score": 0.8, "accepted": True}, {"score": 0.02, "accepted": False}]
    assert best_round(rounds, 0.3) == 1  # latest clean accepted round, not the drifted or rejected one
    assert best_round([{"score": 0.9}, {"score": 0.5}, {"score": 0.7}], 0.3) == 1  # all drifted: least
    assert best_round([{"score": 0.1, "accepted": False}], 0.3) is None


def test_gate_rejects_a_version_that_loses():
    posts = ["post 1", "post 2", "post 3"]
    new, old = ["short", "short", "short"], ["a longer and warmer reply"] * 3

    def prefer_longer(post, a, b):  # a position-consistent stand-in judge, to check the decision logic only
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"

    outcomes = both_orders(prefer_longer, posts, new, old)
    assert outcomes == [0.0, 0.0, 0.0]
    assert decide(outcomes)["accepted"] is False
    assert decide(both_orders(prefer_longer, posts, old, new))["accepted"] is True
    # a judge that always says "A" is position-biased: both orders disagree, so every prompt is a tie
    always_a = both_orders(lambda p, a, b: "A", posts, new, old)
    assert always_a == [0.5] * 3 and decide(always_a)["accepted"] is False
    assert decide([None, None])["accepted"] is False and decide([None, None])["invalid"] == 2
    # one win and seven ties: more wins than losses, but the win rate's interval reaches 0.5: rejected
    one_win = decide([1.0] + [0.5] * 7)
    assert one_win["wins"] == 1 and one_win["losses"] == 0 and one_win["accepted"] is False
    assert one_win["win_rate"]["lo"] == 0.5
    # a clear margin passes, and a recipe margin above it does not
    assert decide([1.0] * 6 + [0.5] * 2)["accepted"] is True
    assert decide([1.0] * 6 + [0.5] * 2, margin=0.45)["accepted"] is False


def test_gate_dev_prompts_span_scenes():
    from toushi.guidance.gate import draw_dev

    pairs = [{"id": f"{s}{i}", "scene": s} for s in ("work", "family", "school") for i in range(5)]
    dev, rest = draw_dev(pairs, 6, seed=0)
    assert sorted(p["scene"] for p in dev) == ["family", "family", "school", "school", "work", "work"]
    assert len(rest) == 9 and not {p["id"] for p in dev} & {p["id"] for p in rest}
    assert [p["id"] for p in rest] == [p["id"] for p in pairs if p not in dev]  # the rest keep their order
    assert draw_dev(pairs, 6, seed=0) == (dev, rest)  # seeded: the same dev set on a rerun
    assert len(draw_dev(pairs, 40, seed=0)[0]) == 15


def test_packing_fits_real_tokenizer(offline_model):
    count = token_counter(str(offline_model))
    assert count("hello there, how are you") < 12  # a real tokenizer, not the character estimate
    posts = json.loads("[" + ",".join((REPO / "data" / "venting_en.jsonl").read_text().splitlines()[:10]) + "]")
    pairs = [{"id": p["id"], "label": f"p{i}", "post": p["text"],
              "answers": [{"label": "A", "text": p["text"][:300]}, {"label": "B", "text": p["text"][-300:]}]}
             for i, p in enumerate(posts, 1)]
    budget = 700

    def fits(batch):
        return sum(count(p["post"]) + sum(count(a["text"]) for a in p["answers"]) for p in batch) <= budget

    batches = pack([shrink_pair(p, fits) for p in pairs], 4, fits)
    assert [p["id"] for b in batches for p in b] == [p["id"] for p in pairs]  # nothing lost, order kept
    assert all(len(b) <= 4 and fits(b) for b in batches)
    assert len(batches) > 3  # batches of 4 did not fit: they were split
    huge = {**pairs[0], "post": pairs[0]["post"] * 6}
    shrunk = shrink_pair(huge, fits)
    assert fits([shrunk]) and "truncated" in shrunk["flags"]
    with pytest.raises(ValueError, match="token budget"):
        shrink_pair(huge, lambda b: False)


# --------------------------------------------------------------------------------- end to end, offline model


def _posts(n: int) -> list[dict]:
    lines = (REPO / "data" / "venting_en.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines[:n]]


@pytest.fixture(scope="module")
def engine(vllm_engine):
    return vllm_engine


@pytest.fixture(scope="module")
def pairs_records(engine) -> list[dict]:
    """A small real pairs records set: the offline model answers real posts plainly (weak) and with a
    careful system prompt (strong)."""
    from toushi.templates import render

    posts = _posts(6)
    prompts = [render("support_task", "en", post=p["text"][:600], constraints=True) for p in posts]
    # one sentence each: an answer cut off at max_tokens is never a contrast, so these must finish
    s = Sampling(temperature=0.7, max_tokens=48, seed=0, stop=["."])
    weak = engine.generate([[{"role": "user", "content": q}] for q in prompts], s)
    strong = engine.generate([[{"role": "system", "content": "You are a warm, careful listener. Name the feeling, "
                                                             "then offer one small practical step."},
                               {"role": "user", "content": q}] for q in prompts], s)
    return [{"id": p["id"], "lang": "en", "scene": p["scene"], "split": "heldout" if i == 5 else "train",
             "post": p["text"][:600], "prompt": q, "weak": [w[0].to_dict()], "strong": [st[0].to_dict()]}
            for i, (p, q, w, st) in enumerate(zip(posts, prompts, weak, strong))]


class Counting:
    """Counts generate calls (and can stop after some, as a kill would) around the real engine."""

    def __init__(self, engine, stop_after: int | None = None):
        self.engine, self.stop_after, self.calls, self.prompts = engine, stop_after, 0, 0
        self.spec = engine.spec

    def generate(self, conversations, sampling, **kwargs):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.prompts += len(conversations)
        return self.engine.generate(conversations, sampling, **kwargs)


@functools.cache
def _counter(model_path: str):
    """One tokenizer a module for the sessions' token counts (a load each is 0.3 s of the test; AVX512-BF16 kind)."""
    return token_counter(model_path)


def _session(tmp_path, engine, pairs, mode, **kw) -> Session:
    store = StageStore(tmp_path, "guidance")
    spec_path = str(Path(engine.spec.name))
    return Session(
        store=store, lang="en", calls=Calls(store, "smollm2", lambda: engine, Sampling(temperature=0.3, max_tokens=768), kind="guidance"),
        pairs=pairs, blind=kw.get("blind", True), cap=3, max_dimensions=4, batch_size=kw.get("batch_size", 3),
        count_tokens=_counter(spec_path), prompt_budget=kw.get("budget", 1200), drift_threshold=0.3, mode=mode,
        gate=kw.get("gate"), seeds={d["name"]: d["definition"] for d in rubric("en")[:kw.get("seeds", 3)]},
    )


def _check_outputs(s: Session, pairs: list[dict], corpus_ids: set[str]) -> None:
    from toushi.guidance import finish

    counts = finish(s, s.store, pairs, 0, False)
    d = s.store.dir
    data = json.loads((d / "guidance.json").read_text())
    # decoded under the operations schema, the model's answers are all usable: no malformed operation, no
    # raw output kept aside, and at least three dimensions with rules (fails when the model emits nothing)
    assert counts["malformed_ops"] == 0 and counts["unstructured"] == 0 and counts["unknown_pair_ids"] == 0
    usable = [dim for dim in data["dimensions"] if "unstructured" not in dim["flags"] and dim["rules"]]
    assert len(usable) >= 3, data["dimensions"]
    for dim in data["dimensions"]:
        for r in dim["rules"]:
            assert r["text"].strip()
            assert set(r["pair_ids"]) <= corpus_ids  # provenance: every referenced pair exists
        for e in dim["examples"]:
            assert set(e["pair_ids"]) <= corpus_ids
    assert (d / "guidance.md").read_text().startswith("# Guidance")
    assert load_guidance(d.parent) == data["system_prompt"] == (d / "system_prompt.txt").read_text().strip()
    index = json.loads((d / "history" / "index.json").read_text())
    assert len(index) == counts["versions"] >= 1
    for v in index:
        assert (d / "history" / f"v{v['version']:03d}.diff").exists()
    drift = json.loads((d / "drift.json").read_text())
    assert len(drift["rounds"]) == len(index) and drift["chosen"] is not None
    from toushi.report import load_drift  # the report reads what the guidance stage writes
    assert [r["round"] for r in load_drift(d.parent)] == [v["version"] for v in index]
    assert list((d / "prompts").glob("*.txt")) and list((d / "intermediate").glob("*.json"))
    for f in (d / "intermediate").glob("*.json"):
        inter = json.loads(f.read_text())
        assert "output" in inter and "memory" in inter
        if inter["flags"] == ["unstructured"]:  # repair was tried, then the raw text kept and flagged
            assert inter["repair_output"] is not None
            assert (d / "prompts" / f"{inter['step']}.repair.txt").exists()
            assert any(inter["step"] in r["flags"] for dim in inter["memory"]["dimensions"] for r in dim["rules"])
    assert counts["calls"] + counts["cached_calls"] > 0


@pytest.mark.parametrize("mode", ["map-reduce", "refine", "broad-to-deep", "per-example"])
def test_mode_end_to_end(mode, tmp_path, engine, pairs_records):
    pairs, _ = build_pairs(pairs_records, blind=True, seed=0)
    assert len(pairs) == 5 and all(p["label"] for p in pairs)
    if mode == "per-example":  # one call per pair: three pairs show the per-pair calls and the synthesis
        pairs = pairs[:3]
    s = _session(tmp_path, engine, pairs, mode)
    M.MODES[mode](s, pairs)
    _check_outputs(s, pairs, {r["id"] for r in pairs_records})
    if mode == "map-reduce":  # a worked example (constrained JSON, rendered) for every dimension with rules
        data = json.loads((tmp_path / "guidance" / "guidance.json").read_text())
        for dim in data["dimensions"]:
            if dim["rules"]:
                worked = [e for e in dim["examples"] if e["kind"] == "worked"]
                assert worked and worked[0]["text"].startswith("“") and worked[0]["pair_ids"], dim


def test_resume_after_kill_repeats_no_finished_call(tmp_path, engine, pairs_records):
    pairs, _ = build_pairs(pairs_records, blind=False, seed=0)
    killed = Counting(engine, stop_after=2)
    s = _session(tmp_path, killed, pairs, "refine", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        M.refine(s, pairs)
    done = StageStore(tmp_path, "guidance").ids()
    assert done and killed.calls == 2
    again = Counting(engine)
    s2 = _session(tmp_path, again, pairs, "refine", batch_size=2)
    M.refine(s2, pairs)
    assert s2.calls.stats.cached >= len(done)
    records = StageStore(tmp_path, "guidance").records()
    assert len(records) == len({r["id"] for r in records})  # nothing generated twice
    full = Counting(engine)
    s3 = _session(tmp_path, full, pairs, "refine", batch_size=2)
    M.refine(s3, pairs)
    assert full.calls == 0  # a finished run is entirely cached
    assert [v["score"] for v in s3.versions] == [v["score"] for v in s2.versions]


def test_repair_path_keeps_structured_repair(tmp_path, engine, pairs_records):
    """A first answer without operations gets one repair call; when that call answers with operations,
    they are applied and the step is flagged 'repaired'."""
    pairs, _ = build_pairs(pairs_records, blind=True, seed=0)

    class Scripted:  # the analysis model's outputs are scripted to exercise the parser's two branches
        def __init__(self):
            self.n = 0

        def generate(self, conversations, sampling, structured=None):
            from toushi.engines import make_completion

            out = []
            for conv in conversations:
                self.n += 1
                text = ("The better replies are warmer." if "did not use the required format" not in conv[-1]["content"]
                        else "DIM Warmth: Sound like a person.\nADD D1: Name the feeling first [p1]")
                out.append([make_completion(text, finish_reason="stop", prompt_tokens=0, completion_tokens=0,
                                            latency_s=0.0, model="scripted")])
            return out

    s = _session(tmp_path, engine, pairs, "per-example")
    s.calls.open_engine = Scripted
    M.per_example(s, pairs[:2])
    inter = json.loads((tmp_path / "guidance" / "intermediate" / "example-000.json").read_text())
    assert inter["flags"] == ["repaired"] and inter["ops"][0].startswith("DIM Warmth")
    mem = s.current()
    assert mem.dimensions[0].name == "Warmth" and mem.dimensions[0].rules[0].pair_ids == [pairs[0]["id"]]


# --------------------------------------------------------------------------------- the stage


def _recipe(tmp_path, offline_model, **guidance):
    text = (REPO / "recipes" / "tiny-cpu.yaml").read_text()
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    sets = [f"run.dir={tmp_path / 'runs'}", f"models.strong.name={offline_model}",
            f"models.weak.name={offline_model}", "models.strong.gpu_memory_utilization=0.08"]
    sets += [f"guidance.{k}={v}" for k, v in guidance.items()]
    return load_recipe(path, sets)


def test_stage_and_hand_edit(tmp_path, offline_model, pairs_records, engine, monkeypatch):
    # refine, the cheapest mode: the modes themselves are tested above; this is the stage and the hand edit
    r = _recipe(tmp_path, offline_model, mode="refine", max_pairs=3, batch_size=2)
    pairs_store = StageStore(r.run_dir, "pairs")
    with pairs_store.writer() as w:
        w.write_many(pairs_records)
    store = StageStore(r.run_dir, "guidance")
    from toushi.guidance import EnginePool

    # the stage builds its engine from the recipe; reuse the module's engine instead of loading another
    monkeypatch.setattr(EnginePool, "get", lambda self, spec: engine)
    monkeypatch.setattr(EnginePool, "close", lambda self: None)
    counts = run_stage(StageContext(recipe=declared_view(r, "guidance"), store=store))
    assert counts["pairs"] == 3 and counts["versions"] == 2 and store.manifest()["hand_edited"] is False
    md = (store.dir / "guidance.md").read_text()
    edited = tmp_path / "mine.md"
    edited.write_text(md + "\n## Pacing\nKeep it short.\n- Two or three sentences are enough\n", encoding="utf-8")
    r2 = _recipe(tmp_path, offline_model, edited_file=edited)
    counts = run_stage(StageContext(recipe=declared_view(r2, "guidance"), store=store))
    assert counts["hand_edited"] is True and store.manifest()["hand_edited"] is True
    assert "Two or three sentences are enough" in load_guidance(r.run_dir)
    index = json.loads((store.dir / "history" / "index.json").read_text())
    assert index[-1]["label"] == "hand-edit" and len(index) == 3
    assert "+- Two or three sentences are enough" in (store.dir / "history" / "v003.diff").read_text()


def test_stage_with_acceptance_gate(tmp_path, offline_model, pairs_records, engine, monkeypatch):
    """The gate end to end on CPU: dev prompts set aside, the weak role answers them with each version's
    guidance, the (constrained, logprob) judge compares both orders; every version gets a decision with no
    invalid verdict. The strong, weak and judge roles are asked of the run's one engine pool."""
    r = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [
        f"run.dir={tmp_path / 'runs'}", *(f"models.{role}.name={offline_model}" for role in ("strong", "weak", "judge")),
        "guidance.mode=refine", "guidance.max_pairs=3", "guidance.accept_gate=true", "guidance.dev_prompts=2",
        "guidance.batch_size=2"])
    with StageStore(r.run_dir, "pairs").writer() as w:
        w.write_many(pairs_records)
    store = StageStore(r.run_dir, "guidance")
    from toushi.guidance import EnginePool

    asked: list[str] = []
    monkeypatch.setattr(EnginePool, "get", lambda self, spec: asked.append(spec.name) or engine)
    monkeypatch.setattr(EnginePool, "close", lambda self: None)
    counts = run_stage(StageContext(recipe=declared_view(r, "guidance"), store=store))
    assert counts["versions"] >= 2
    index = json.loads((store.dir / "history" / "index.json").read_text())
    for v in index:
        g = v["gate"]
        assert g["prompts"] == 2 and g["invalid"] == 0 and g["wins"] + g["ties"] + g["losses"] == 2
        assert v["accepted"] == g["accepted"]
    assert len(asked) >= 3 and set(asked) == {str(offline_model)}
    gate_calls = StageStore(store.dir, "gate").records()  # the gate's judge calls (toushi/calls.py)
    # logprob mode: the JSON verdict and the choice token of each; every verdict read at once, so no retry
    assert gate_calls and {c["kind"] for c in gate_calls} == {"judge", "judge-choice"}
    assert {c["order"] for c in gate_calls} == {"sr", "rs"}  # both orders of every comparison
    # the dev prompts were set aside: of the 5 train pairs, the analysis calls saw only the other 3
    labelled = set(json.loads((store.dir / "labels.json").read_text()))
    analysed = {i for f in (store.dir / "intermediate").glob("*.json") for i in json.loads(f.read_text())["pair_ids"]}
    assert len(labelled) == 5 and len(analysed) == 3 and analysed < labelled


def test_guidance_show_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from toushi.cli import app
    from toushi.guidance import write_outputs

    mem = Memory(cap=6)
    mem.apply(parse_ops("DIM Validation: Name the feeling.\nADD D1: Reflect the feeling in their words [p1]").ops,
              ALIASES)
    write_outputs(StageStore(tmp_path / "runs" / "demo", "guidance"), mem, {"mode": "refine", "version": 1}, "en")
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(app, ["guidance", "show", "demo"])
    assert shown.exit_code == 0 and "Validation" in shown.output and "Reflect the feeling" in shown.output
    prompt = CliRunner().invoke(app, ["guidance", "show", "demo", "--system-prompt"])
    assert prompt.exit_code == 0 and prompt.output.strip() == load_guidance(tmp_path / "runs" / "demo")
    missing = CliRunner().invoke(app, ["guidance", "show", str(tmp_path)])
    assert missing.exit_code == 2 and "no guidance" in missing.output
