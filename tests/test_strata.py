"""Results by emotion, intent and scene, and the ladder's rung-to-rung verdicts, on known records (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toushi.eval.evaluate import METRIC_NAMES, answer_metrics, summarise
from toushi.eval.judge import PairTask, aggregate
from toushi.eval.ladder import HELPED, HURT, TOO_FEW, UNCLEAR, compare, rungs, steps, verdict
from toushi.eval.simulate import seeker_summary
from toushi.eval.strata import UNLABELLED, small_cells
from toushi.report import build_report

# six held-out posts: four anxious (two of them unlabelled for intent), two angry
POSTS = {
    "p0": ("anxiety", "advice", "work"), "p1": ("anxiety", "be_heard", "work"), "p2": ("anxiety", None, "school"),
    "p3": ("anxiety", None, "school"), "p4": ("anger", "vent_anger", "work"), "p5": ("anger", "vent_anger", "family"),
}
SYSTEMS = ["weak", "sft", "strong"]


def answers() -> list[dict]:
    out = []
    for s in SYSTEMS:
        for pid, (emotion, intent, scene) in POSTS.items():
            # sft writes markdown to the angry posts only: visible by emotion, diluted overall
            text = "- **calm down**" if s == "sft" and emotion == "anger" else f"({s}) that sounds hard, {pid}."
            out.append({"id": f"{s}-{pid}", "system": s, "prompt_id": pid, "emotion": emotion, "intent": intent,
                        "scene": scene, "post": f"post {pid}", "text": text,
                        "metrics": {**answer_metrics(f"post {pid}", text), "embed_sim": None}})
    return out


def judged(tasks: list[PairTask], verdicts) -> list[dict]:
    """Aggregated pairs from scripted calls: verdicts(task) -> (verdict when the system is A, when it is B)."""
    calls = []
    for t in tasks:
        sr, rs = verdicts(t)
        for order, v in (("sr", sr), ("rs", rs)):
            calls.append({"pair_id": t.pair_id, "order": order, "valid": v is not None, "verdict": v, "dims": {}})
    return aggregate(tasks, calls, [])


def task(pid: str, system: str, reference: str) -> PairTask:
    return PairTask(pid, "en", f"post {pid}", system, f"({system})", reference, f"({reference})")


def test_stratified_tables_on_two_emotions(tmp_path):
    recs = answers()
    # the judge: sft beats weak on anxious posts, loses on angry ones; strong always wins
    pairs = judged([task(p, s, "weak") for s in ("sft", "strong") for p in POSTS],
                   lambda t: ("A", "B") if t.system == "strong" or POSTS[t.prompt_id][0] == "anxiety" else ("B", "A"))
    seeker = [{"system": s, "prompt_id": p, "before": 30, "after": None if d is None else 30 + d, "delta": d, "valid": d is not None}
              for s in SYSTEMS for p in POSTS
              for d in [None if (s, p) == ("weak", "p5") else (10 if s == "strong" else -5 if POSTS[p][0] == "anger" else 5)]]
    judge = {"model": "scripted", "reference": "weak", "dimensions": [], "calls": 24, "invalid_calls": 0,
             "retried_calls": 0, "systems": {}, "pairs": pairs, "ladder_pairs": []}
    block = {"model": "scripted", "turns": 1, "posts": 6, "calls": 24, "invalid_calls": 1, "items": seeker,
             "systems": seeker_summary(seeker, n_boot=200)}
    summary = summarise(recs, [], judge, n_boot=200, seed=0, seeker=block, min_posts=3)
    strata = summary["strata"]
    assert strata["min_posts"] == 3 and list(strata["facets"]) == ["emotion", "intent", "scene"]

    emotion = {c["value"]: c for c in strata["facets"]["emotion"]}
    assert list(emotion) == ["anxiety", "anger"]  # largest cell first
    assert (emotion["anxiety"]["posts"], emotion["anger"]["posts"]) == (4, 2)
    assert not emotion["anxiety"]["few"] and emotion["anger"]["few"]
    # every metric per cell: sft's markdown rate is 1 on angry posts, 0 on anxious ones (1/3 overall)
    assert set(emotion["anger"]["metrics"]["sft"]) == set(METRIC_NAMES)
    assert emotion["anger"]["metrics"]["sft"]["markdown"]["mean"] == 1.0
    assert emotion["anxiety"]["metrics"]["sft"]["markdown"]["mean"] == 0.0
    assert summary["metrics"]["sft"]["markdown"]["mean"] == pytest.approx(1 / 3)
    # judge win rate per cell, with counts: sft wins every anxious post and loses every angry one
    assert emotion["anxiety"]["judge"]["sft"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 4}
    assert emotion["anger"]["judge"]["sft"]["mean"] == 0.0 and emotion["anger"]["judge"]["sft"]["n"] == 2
    assert "weak" not in emotion["anger"]["judge"]  # the reference is not judged against itself
    # seeker change per cell: the invalid simulation (weak, p5) is left out of the count, not scored as 0
    assert emotion["anger"]["seeker"]["weak"]["n"] == 1 and emotion["anger"]["seeker"]["weak"]["mean"] == -5
    assert emotion["anxiety"]["seeker"]["strong"]["mean"] == 10
    # the bootstrap interval is the seeded percentile interval of resampled means
    values = [r["metrics"]["chars"] for r in recs if r["system"] == "weak" and POSTS[r["prompt_id"]][0] == "anxiety"]
    ci = emotion["anxiety"]["metrics"]["weak"]["chars"]
    boots = np.asarray(values, float)[np.random.default_rng(0).integers(0, 4, size=(200, 4))].mean(axis=1)
    assert (ci["lo"], ci["hi"]) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))
    # posts without an intent form their own cell, so every facet's cells add up to all posts
    intent = {c["value"]: c["posts"] for c in strata["facets"]["intent"]}
    assert list(intent.items()) == [("vent_anger", 2), (UNLABELLED, 2), ("advice", 1), ("be_heard", 1)]
    assert all(sum(c["posts"] for c in cells) == 6 for cells in strata["facets"].values())
    notes = small_cells(strata)
    assert any(n.startswith("by emotion: 1 of 2 cells have fewer than 3 posts") and "anger (2)" in n for n in notes)

    # the report: one table per facet for the judge and for the seeker, small cells marked
    run = tmp_path / "runs" / "strata"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary.update(n_prompts=6, prompt_ids=list(POSTS), notes=notes, student_model=None)
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    html = build_report(run).read_text()
    for facet in ("emotion", "intent", "scene"):
        assert f'id="strata-{facet}-judge"' in html and f'id="strata-{facet}-seeker"' in html
        assert f'id="strata-{facet}-metrics"' in html
    assert '<tr class="few"><td>anger</td><td>2</td>' in html
    assert "<tr><td>anxiety</td><td>4</td><td>1.00 (n=4)</td>" in html


def test_ladder_order_and_rung_verdicts():
    systems = ["strong", "student", "sft", "weak", "grpo", "guided", "distill"]
    assert rungs(systems) == ["weak", "guided", "sft", "distill", "grpo", "strong"]  # student is not a rung
    assert steps(systems)[0] == ("weak", "guided") and steps(systems)[-1] == ("grpo", "strong")
    assert verdict({"mean": 0.8, "lo": 0.6, "hi": 0.9, "n": 9}, 0.5) == HELPED
    assert verdict({"mean": -3.0, "lo": -5.0, "hi": -1.0, "n": 9}, 0.0) == HURT
    assert verdict({"mean": 0.6, "lo": 0.4, "hi": 0.8, "n": 9}, 0.5) == UNCLEAR
    assert verdict({"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 1}, 0.5) == TOO_FEW
    # an interval that clears the line on fewer posts than eval.strata.min_posts says so, not "helped"
    assert verdict({"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}, 0.5, min_posts=5) == TOO_FEW
    assert verdict({"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 5}, 0.5, min_posts=5) == HELPED
    assert verdict({"mean": None, "lo": None, "hi": None, "n": 0}, 0.5) is None

    posts = [f"p{i}" for i in range(8)]
    ladder_systems = ["weak", "guided", "sft", "strong"]
    # guided beats weak everywhere; sft vs guided: order-inconsistent (ties); strong loses to sft everywhere
    script = {"guided": ("A", "B"), "sft": ("A", "A"), "strong": ("B", "A")}
    pairs = judged([task(p, cur, prev) for prev, cur in steps(ladder_systems) for p in posts],
                   lambda t: script[t.system])
    gain = {"weak": 0, "guided": 10, "sft": 10, "strong": 4}
    items = [{"system": s, "prompt_id": p, "before": 40, "after": 40 + gain[s] + i % 3, "delta": gain[s] + i % 3,
              "valid": not (s == "strong" and i == 0)} for s in ladder_systems for i, p in enumerate(posts)]
    out = compare(ladder_systems, pairs, items, n_boot=200, seed=0, min_posts=5)
    assert out["rungs"] == ladder_systems
    by = {st["to"]: st for st in out["steps"]}
    assert [(st["from"], st["to"]) for st in out["steps"]] == [("weak", "guided"), ("guided", "sft"), ("sft", "strong")]
    assert by["guided"]["judge"]["verdict"] == HELPED and by["guided"]["judge"]["wins"] == 8
    assert by["sft"]["judge"]["verdict"] == UNCLEAR and by["sft"]["judge"]["ties"] == 8
    assert by["strong"]["judge"]["verdict"] == HURT
    # the seeker: paired differences on the same posts; the post with an invalid simulation drops out
    assert by["guided"]["seeker"]["verdict"] == HELPED and by["guided"]["seeker"]["ci"]["mean"] == 10
    assert by["sft"]["seeker"]["verdict"] == UNCLEAR and by["sft"]["seeker"]["ci"]["mean"] == 0
    assert by["strong"]["seeker"]["verdict"] == HURT and by["strong"]["seeker"]["posts"] == 7
    assert by["strong"]["seeker"]["unpaired"] == 1
    # without judge or seeker data a step still appears, with nothing to say
    few = compare(ladder_systems, pairs, items, n_boot=200, seed=0, min_posts=9)
    assert {st["judge"]["verdict"] for st in few["steps"]} == {st["seeker"]["verdict"] for st in few["steps"]} == {TOO_FEW}
    bare = compare(ladder_systems)
    assert [st["judge"] for st in bare["steps"]] == [None] * 3 and bare["steps"][0]["seeker"] is None
