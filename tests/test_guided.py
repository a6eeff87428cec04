"""The guided stage: the weak model answers with the guidance as system prompt (+ retrieved examples)."""

from __future__ import annotations

import json

import pytest

from toushi.guided import char_ngram_vectors, retrieve, run_stage
from toushi.recipe import Recipe
from toushi.runner import StageContext
from toushi.stages import declared_view
from toushi.store import StageStore

POSTS = [
    ("g1", "train", "I failed my driving test for the third time and I feel useless."),
    ("g2", "train", "My cat died this morning and the flat is so quiet."),
    ("g3", "train", "I failed my maths exam again and my parents will be disappointed."),
    ("g4", "heldout", "I failed my final exam and I don't know how to tell my parents."),
]
GUIDANCE = {
    "dimensions": [{"name": "Validation", "definition": "Name the feeling before anything else.",
                    "rules": [{"text": "Say what the person seems to feel, in their words", "support": 2,
                               "pair_ids": ["g1"]}], "examples": []}],
}


def completion(text: str, flags=()) -> dict:
    return {"text": text, "reasoning": None, "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 10,
            "latency_s": 0.1, "model": "t", "flags": list(flags)}


def write_run(run_dir, guidance=GUIDANCE) -> None:
    with StageStore(run_dir, "pairs").writer() as w:
        for pid, split, post in POSTS:
            strong = completion(f"Strong reply to {pid}.", flags=["markdown"] if pid == "g1" else [])
            w.write({"id": pid, "lang": "en", "scene": "s", "split": split, "post": post,
                     "prompt": f"Reply to this post:\n{post}", "weak": [completion("ok")], "strong": [strong]})
    g = StageStore(run_dir, "guidance")
    g.dir.mkdir(parents=True, exist_ok=True)
    (g.dir / "guidance.json").write_text(json.dumps(guidance), encoding="utf-8")


def make_ctx(tmp_path, model, **guided) -> StageContext:
    recipe = Recipe.model_validate({
        "run": {"name": "t", "dir": str(tmp_path)},
        "models": {"weak": {"name": str(model), "engine": "hf", "dtype": "float32",
                            "sampling": {"temperature": 0.0, "max_tokens": 8}}},
        "guided": guided,
    })
    return StageContext(recipe=declared_view(recipe, "guided"), store=StageStore(recipe.run_dir, "guided"))


def test_retrieval_picks_similar_posts_and_never_the_post_itself():
    posts = [p for _, _, p in POSTS]
    ids = [i for i, _, _ in POSTS]
    got = retrieve([posts[3], posts[1]], ids, posts, k=2)
    # the exam posts are closest to the held-out exam post; the cat post's own entry is skipped
    assert got[0][0] == "g3" and "g4" not in got[0]
    assert got[1] and "g2" not in got[1]
    v = char_ngram_vectors(["我考试又挂了", "我考试挂了", "猫死了"])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_guided_stage_writes_comparable_records_and_resumes(tmp_path, tiny_model):
    ctx = make_ctx(tmp_path, tiny_model, retrieved_examples=1)
    write_run(ctx.run_dir)
    counts = run_stage(ctx)
    assert counts["generated"] == 4 and counts["records"] == 4
    recs = {r["id"]: r for r in ctx.store.records()}
    pairs = {r["id"]: r for r in StageStore(ctx.run_dir, "pairs").records()}
    assert set(recs) == set(pairs)
    for rid, r in recs.items():
        assert r["prompt"] == pairs[rid]["prompt"] and r["split"] == pairs[rid]["split"]
        assert "Say what the person seems to feel" in r["system"]
        assert len(r["guided"]) == 1 and set(r["guided"][0]) >= {"text", "flags", "completion_tokens"}
        # examples: train posts with a clean strong answer (g1's is flagged markdown), never itself
        assert r["examples"] and rid not in r["examples"] and "g1" not in r["examples"] and "g4" not in r["examples"]
    assert recs["g4"]["examples"] == ["g3"] and "Strong reply to g3." in recs["g4"]["system"]

    again = run_stage(ctx)
    assert again["generated"] == 0 and again["cached"] == 4 and len(ctx.store.records()) == 4

    # a changed guidance makes every answer stale: regenerated, never mixed with the old ones
    changed = json.loads(json.dumps(GUIDANCE))
    changed["dimensions"][0]["rules"][0]["text"] = "Ask one gentle question"
    write_run(ctx.run_dir, changed)
    third = run_stage(ctx)
    assert third["generated"] == 4 and len(ctx.store.records()) == 4
    assert all("Ask one gentle question" in r["system"] for r in ctx.store.records())


def test_guided_stage_needs_guidance(tmp_path, tiny_model):
    ctx = make_ctx(tmp_path, tiny_model)
    with StageStore(ctx.run_dir, "pairs").writer() as w:
        w.write({"id": "x", "split": "train", "post": "p", "prompt": "p", "weak": [], "strong": []})
    with pytest.raises(FileNotFoundError, match="guidance"):
        run_stage(ctx)
