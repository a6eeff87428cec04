"""The eval stage end to end on real files and real models: pairs/guided records in the contract shapes,
real PEFT adapters (LoRA with perturbed lora_B) served by a real vLLM engine, held-out NLL with
transformers + PEFT, a real (tiny) judge, then the report stage over the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_lora_adapter

from toushi.recipe import Recipe
from toushi.runner import run_stages
from toushi.stages import STAGES
from toushi.store import StageStore

POSTS = [
    ("I got laid off after eight years and I can't tell my parents.", "heldout"),
    ("My best friend stopped answering my messages and I don't know what I did.", "heldout"),
    ("I failed my driving test for the third time today.", "heldout"),
    ("Everyone at my new school already has friends.", "train"),
]
WEAK = ["Stay positive! Things will get better.", "- Don't worry\n- **Be strong**", "Try again!", "Make friends."]
STRONG = [
    "Eight years is a long time to give a place, and losing it can feel like losing part of who you are. "
    "It makes sense you dread telling your parents. Maybe start with the one who is easiest to talk to?",
    "Silence from someone close hurts, and the not knowing is its own kind of hard. You could send one "
    "short, gentle message asking if they're okay, without blaming yourself or them.",
    "Three times is discouraging, and it's okay to feel fed up tonight. Lots of good drivers needed "
    "several tries; what tripped you up this time?",
    "Starting somewhere new is lonely at first.",
]


def completion(text: str) -> dict:
    return {"text": text, "reasoning": None, "finish_reason": "stop", "prompt_tokens": 40,
            "completion_tokens": len(text.split()), "latency_s": 0.1, "model": "test", "flags": []}


def write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("eval")
    run = root / "runs" / "ev"
    pairs, guided = [], []
    for i, (post, split) in enumerate(POSTS):
        prompt = f"Please offer emotional support to the person who wrote the following:\n```\n{post}\n```"
        rec = {"id": f"id{i}", "lang": "en", "scene": "life", "split": split, "post": post, "prompt": prompt,
               "weak": [completion(WEAK[i])], "strong": [completion(STRONG[i])]}
        pairs.append(rec)
        guided.append({**{k: rec[k] for k in ("id", "lang", "scene", "split", "post", "prompt")},
                       "system": "Be specific.", "guided": [completion(f"That sounds hard: {post.lower()}")]})
    write_records(run / "pairs" / "records.jsonl", pairs)
    write_records(run / "guided" / "records.jsonl", guided)
    (run / "guidance").mkdir(parents=True)
    (run / "guidance" / "guidance.json").write_text(json.dumps(
        {"dimensions": [{"name": "concrete next step", "definition": "one small doable action",
                         "rules": [{"text": "end with one small step they could take today", "flags": []}]},
                        {"name": "Unstructured notes", "definition": "raw model output", "flags": ["unstructured"],
                         "rules": [{"text": "whatever the model wrote", "flags": ["unstructured"]}]}]}))
    make_lora_adapter(tiny_model, run / "sft" / "adapter", seed=1)
    make_lora_adapter(tiny_model, run / "dpo" / "adapter", seed=2)
    return run


def recipe_for(run: Path, tiny_model: Path) -> Recipe:
    model = {"name": str(tiny_model), "engine": "vllm", "enforce_eager": True, "kv_cache_gb": 0.1,
             "max_model_len": 1536, "dtype": "float32"}
    return Recipe.model_validate({
        "run": {"name": run.name, "dir": str(run.parent), "lang": "en", "stages": ["eval", "report"]},
        "models": {"student": model,
                   # the transformers engine judges here: no second vLLM start, same judge code path
                   "judge": {**model, "engine": "hf", "hf_batch_size": 16}},
        "eval": {"max_prompts": 3, "bootstrap": 50, "embeddings": True,
                 "sampling": {"temperature": 0.0, "max_tokens": 12},
                 "judge_sampling": {"temperature": 0.0, "max_tokens": 12},
                 # the judge's engine plays the seeker too: its constrained answer always carries a score
                 "simulate": {"enabled": True, "role": "judge", "max_posts": 2,
                              "sampling": {"temperature": 0.0, "max_tokens": 16}}},
    })


def test_eval_stage_end_to_end(run_dir, tiny_model, monkeypatch):
    import toushi.engines

    started = []
    real = toushi.engines.make_engine
    monkeypatch.setattr(toushi.engines, "make_engine", lambda spec: started.append(spec.engine) or real(spec))

    recipe = recipe_for(run_dir, tiny_model)
    assert run_stages(recipe, STAGES) == {"eval": "ran", "report": "ran"}
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())

    # every system the run produced, on the 3 held-out prompts only; grpo has no adapter
    assert summary["systems"] == ["weak", "guided", "student", "sft", "dpo", "strong"]
    assert summary["n_prompts"] == 3 and summary["prompt_ids"] == ["id0", "id1", "id2"]
    assert any("grpo" in n for n in summary["notes"])
    answers = StageStore(run_dir, "eval").records()
    assert len(answers) == 6 * 3
    by = {(a["system"], a["prompt_id"]): a for a in answers}
    assert by[("weak", "id1")]["metrics"]["markdown"] == 1.0
    assert summary["metrics"]["weak"]["markdown"]["mean"] == pytest.approx(1 / 3)
    assert summary["metrics"]["strong"]["markdown"]["mean"] == 0.0
    # the adapters were applied: their greedy answers differ from the base student's
    base = [by[("student", p)]["text"] for p in summary["prompt_ids"]]
    assert [by[("sft", p)]["text"] for p in summary["prompt_ids"]] != base
    assert [by[("dpo", p)]["text"] for p in summary["prompt_ids"]] != base
    # ... each its own (all students are generated in one call, an adapter per request)
    assert [by[("sft", p)]["text"] for p in summary["prompt_ids"]] != [by[("dpo", p)]["text"] for p in summary["prompt_ids"]]
    # embedding similarity to the strong answer, for every system but strong itself
    assert summary["metrics"]["weak"]["embed_sim"]["n"] == 3 and summary["metrics"]["strong"]["embed_sim"]["n"] == 0

    # held-out NLL under base and each adapter: finite, and the adapters change it
    nll = summary["nll"]
    assert set(nll) == {"student", "sft", "dpo"}
    assert all(0 < v["mean"] < 50 and v["n"] == 3 for v in nll.values())
    assert nll["sft"]["mean"] != pytest.approx(nll["student"]["mean"])

    # the judge: 5 systems x 3 prompts x 2 orders, decoded under the verdict schema, so even a random-weight
    # judge gives a verdict on every call: none invalid, every pair scored (fails when the judge emits nothing)
    judge = summary["judge"]
    assert judge["reference"] == "weak" and judge["calls"] == 30 and judge["mode"] == "generate"
    assert "concrete next step" in judge["dimensions"] and "safety" in judge["dimensions"]
    assert "Unstructured notes" not in judge["dimensions"]  # flagged raw output is no criterion
    calls = StageStore(run_dir / "eval", "judge").records()  # the judge's model calls (toushi/calls.py)
    # + the ladder: guided vs weak is a main pair; sft vs guided, dpo vs sft, strong vs dpo are 18 more calls,
    # each made once and none retried (every answer read)
    assert judge["ladder_calls"] == 4 * 3 * 2
    assert [c["kind"] for c in calls] == ["judge"] * (30 + 18) and all(c["completion"]["text"] for c in calls)
    assert all(c["order"] in ("sr", "rs") for c in calls)
    assert judge["invalid_calls"] == 0 and judge["retried_calls"] == 0
    for s in ("guided", "student", "sft", "dpo", "strong"):
        v = judge["systems"][s]
        assert v["pairs"] == 3 and v["valid"] == 3 and v["invalid"] == 0
        assert v["wins"] + v["ties"] + v["losses"] == 3 and 0 <= v["win_rate"]["mean"] <= 1
    # one vLLM engine for the base student and both adapters, then the judge (which also plays the seeker)
    assert started == ["vllm", "hf"]

    # the simulated seeker: every system on the first 2 posts, a score for each (before and after)
    seeker = summary["seeker"]
    assert seeker["posts"] == 2 and seeker["invalid_calls"] == 0 and seeker["calls"] == 2 + 6 * 2
    assert set(seeker["systems"]) == set(summary["systems"])
    for v in seeker["systems"].values():
        assert v["valid"] == 2 and 0 <= v["after"]["mean"] <= 100 and v["delta"]["n"] == 2
    # the ladder: the rungs the run has, each against the one before, every rung judged (constrained verdicts)
    ladder = summary["ladder"]
    assert ladder["rungs"] == ["weak", "guided", "sft", "dpo", "strong"]
    assert [(st["from"], st["to"]) for st in ladder["steps"]] == [
        ("weak", "guided"), ("guided", "sft"), ("sft", "dpo"), ("dpo", "strong")]
    for st in ladder["steps"]:
        assert st["judge"]["wins"] + st["judge"]["ties"] + st["judge"]["losses"] == 3 and st["judge"]["invalid"] == 0
        # 3 judged posts and 2 simulated ones, under eval.strata.min_posts (5): no helped / hurt from so few
        assert st["seeker"]["posts"] == 2 and st["seeker"]["verdict"] == st["judge"]["verdict"] == "too few posts"
    # results by label: one scene for every post, no emotion or intent labels
    strata = summary["strata"]["facets"]
    assert [(c["value"], c["posts"]) for c in strata["scene"]] == [("life", 3)]
    assert [(c["value"], c["posts"]) for c in strata["emotion"]] == [("(unlabelled)", 3)]
    assert all(a["scene"] == "life" and a["emotion"] is None for a in answers)

    # the report covers every system, and its images exist
    html = (run_dir / "report" / "index.html").read_text()
    for s in summary["systems"]:
        assert f"<th>{s}</th>" in html
    assert 'id="ladder"' in html and 'id="seeker"' in html and 'id="strata-scene-seeker"' in html
    assert (run_dir / "report" / "lengths.png").exists() and (run_dir / "report" / "nll.png").exists()
    assert (run_dir / "report" / "ladder.png").exists()

    # a forced rerun generates nothing: students, NLL and judge calls all come from the caches
    sizes = {p: p.stat().st_size for p in (run_dir / "eval").rglob("records.jsonl")}
    started.clear()
    assert run_stages(recipe, STAGES, force={"eval"})["eval"] == "ran"
    assert started == []
    again = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert again["nll"] == summary["nll"] and again["judge"]["systems"] == judge["systems"]
    assert again["seeker"]["items"] == seeker["items"] and again["seeker"]["generated"] == 0
    for p, size in sizes.items():
        if p.parent != run_dir / "eval":  # the per-answer file is rewritten whole; the caches only grow
            assert p.stat().st_size == size, p

    # resume: lose the sft adapter's cached generations; only that system is generated again
    gen = StageStore(run_dir / "eval", "students")
    kept = [r for r in gen.records() if r["system"] != "sft"]
    gen.records_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert run_stages(recipe, STAGES, force={"eval"})["eval"] == "ran"
    assert started == ["vllm"]
    assert len(gen.records()) == 3 * 3
    final = {(a["system"], a["prompt_id"]): a["text"] for a in StageStore(run_dir, "eval").records()}
    assert [final[("sft", p)] for p in summary["prompt_ids"]] == [by[("sft", p)]["text"] for p in summary["prompt_ids"]]


def test_eval_without_heldout_prompts_says_what_to_do(tmp_path, tiny_model):
    run = tmp_path / "runs" / "none"
    write_records(run / "pairs" / "records.jsonl", [
        {"id": "a", "lang": "en", "scene": "s", "split": "train", "post": "p", "prompt": "p",
         "weak": [completion("w")], "strong": [completion("s")]}])
    recipe = recipe_for(run, tiny_model)
    with pytest.raises(Exception, match="no held-out prompts.*include_heldout"):
        run_stages(recipe, STAGES)
    assert StageStore(run, "eval").manifest()["status"] == "failed"


def test_eval_resumes_after_kill(tmp_path, tiny_model):
    """SIGKILL a real `toushi run` of an eval-only recipe while it generates the students' answers: the
    batches written before the kill are kept, and the rerun generates only the answers that are missing."""
    import os
    import signal
    import time

    import yaml
    from test_caching import start_run

    run = tmp_path / "runs" / "killed"
    posts = [f"Post {i}: {post}" for i in range(2) for post, _ in POSTS[:3]]  # 6 held-out prompts
    pairs = [{"id": f"id{i:02d}", "lang": "en", "scene": "life", "split": "heldout", "post": post, "prompt": post,
              "weak": [completion(WEAK[i % 4])], "strong": [completion(STRONG[i % 4])]} for i, post in enumerate(posts)]
    write_records(run / "pairs" / "records.jsonl", pairs)
    make_lora_adapter(tiny_model, run / "sft" / "adapter", seed=1)
    # the transformers engine: no vLLM start, and one answer per batch, so the kill lands between batches
    student = {"name": str(tiny_model), "engine": "hf", "dtype": "float32", "hf_batch_size": 1}
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": run.name, "dir": str(run.parent), "lang": "en", "stages": ["eval"]},
        "models": {"student": student},
        "eval": {"systems": ["student", "sft"], "judge": False, "ladder": False, "bootstrap": 10, "batch_size": 1,
                 "sampling": {"temperature": 0.0, "max_tokens": 16}},
    }))
    students = run / "eval" / "students" / "records.jsonl"
    proc = start_run(recipe, tmp_path / "first.log")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if students.exists() and len(students.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    kept = StageStore(run / "eval", "students").records()
    total = 2 * len(posts)
    assert 2 <= len(kept) < total, "the kill should land while answers were being generated"

    from toushi.recipe import load_recipe

    assert run_stages(load_recipe(recipe), STAGES) == {"eval": "ran"}  # the rerun, in this process
    store = StageStore(run, "eval")
    assert store.manifest()["counts"]["generated"] == total - len(kept)
    ids = [json.loads(line)["id"] for line in students.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == total  # nothing generated twice, nothing lost
    # the answers from before the kill are the ones eval reports
    by = {(a["system"], a["prompt_id"]): a["text"] for a in store.records()}
    assert all(by[(k["system"], k["prompt_id"])] == k["completion"]["text"] for k in kept)
    assert set(store.manifest()["counts"]["truncated"]) == {"student", "sft"}


def test_judge_that_wrote_answers_is_flagged():
    """No models.judge: the strong model judges, and strong is a system under test; a judge of its own is not."""
    from toushi.eval.evaluate import self_judged

    models = {"weak": {"name": "qwen-small"}, "strong": {"name": "r1-distill"}, "student": {"name": "qwen-small"}}
    r = Recipe.model_validate({"run": {"name": "x"}, "models": models})
    systems = ["weak", "guided", "student", "sft", "strong"]
    assert self_judged(r, r.models.strong, systems) == ["strong"]
    assert self_judged(r, r.models.weak, systems) == ["weak", "guided", "student"]  # sft's adapter is its own
    assert self_judged(r, Recipe.model_validate({"run": {"name": "x"}, "models": {
        **models, "judge": {"name": "another-judge"}}}).models.judge, systems) == []
