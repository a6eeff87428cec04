"""The dress rehearsal: the shipped GPU recipe, every stage, on its models' twins (real tokenizers, templates and
vocabularies, random weights) on this CPU, through `toushi run --rehearse` as a user runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from toushi.paths import repo_root
from toushi.recipe import RecipeError, Sampling, load_recipe, walk
from toushi.rehearse import rehearse
from toushi.store import StageStore

RECIPE = repo_root() / "recipes" / "r1-qwen-gpu.yaml"


def completions(record: dict):
    """(role, completion) for every answer a pairs, guided or eval record holds (eval's is the record itself)."""
    if "finish_reason" in record:
        yield record["system"], record
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], dict) and "finish_reason" in value[0]:
            yield from ((key, c) for c in value)


# In `make test`: 1 min 29 s alone on 2 cores of the AVX512-BF16 kind (Session 26, before its changes), 1 min 38-40 s
# pinned to one core after them (five training launches, four engine starts; 3 min 50 s before Python kept its
# bytecode, 2 min 50 s before the trainers left bitsandbytes and vLLM out, 2 min 10-33 s before CPU tensors went on
# huge pages, 1 min 43-48 s on 2 cores before freed memory was kept); the suite's budget counts it (README).
def test_rehearse_r1_qwen_recipe_end_to_end(twins, tmp_path):
    cmd = [sys.executable, "-m", "toushi.cli", "run", str(RECIPE), "--rehearse", "--set", f"run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=repo_root(), env={**os.environ, "COLUMNS": "250"}, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir, out = tmp_path / "r1-qwen-rehearsal", done.stdout
    shipped = load_recipe(RECIPE)

    # the pre-flight ran first, on the twins' real tokenizers: the numbers the recipe's comments state
    assert "distill: student / teacher (strong)" in out
    assert "│ embedding rows      │ 151936" in out and "│ 152064" in out and out.count("151665") >= 2
    assert "both sliced to the first 151936 rows" in out
    assert "end token 151645 is '<|im_end|>' to the student but '<｜Assistant｜>' to the teacher: left out" in out
    assert "special tokens that differ by id: 7 " in out and out.count("│ template round-trip │ ok") == 1

    # the resolved rehearsal recipe is saved with the run: the shipped recipe on twins, scaled down
    saved = load_recipe(run_dir / "recipe.yaml", check_files=False)
    assert saved.run.stages == shipped.run.stages and saved.distill.teacher == "strong"
    assert (saved.models.strong.name, saved.models.weak.name, saved.models.student.name) == (
        "r1-distill-qwen-7b-twin", "qwen2.5-1.5b-instruct-twin", "qwen2.5-1.5b-instruct-twin")
    assert saved.models.strong.reasoning and saved.models.strong.thinking_budget == 1

    # every stage completed
    for stage in shipped.run.stages:
        m = StageStore(run_dir, stage).manifest()
        assert m and m["status"] == "complete", (stage, (m or {}).get("error"))
    counts = {s: StageStore(run_dir, s).manifest()["counts"] for s in shipped.run.stages}

    # answers never hold think text: R1's block is closed by the budget and split off every answer
    answers = 0
    for stage in ("pairs", "guided", "eval"):
        for record in StageStore(run_dir, stage).records():
            for role, c in completions(record):
                answers += 1
                assert "<think>" not in c["text"] and "</think>" not in c["text"], (stage, role, c)
                if c.get("model") == "r1-distill-qwen-7b-twin":  # R1's own answers (eval reuses the pairs')
                    assert "think_budget_hit" in c["flags"] and not c["reasoning"], (stage, role, c)
    assert answers >= 2 * counts["pairs"]["prompts"]
    assert counts["pairs"]["strong_think_budget_hit"] == counts["pairs"]["strong_generated"] > 0

    # every parsed call is valid: tags, guidance operations, judge verdicts and seeker scores were decoded under
    # their constraint after </think>, so random weights still give parseable answers
    assert counts["corpus"]["tagged"] == counts["corpus"]["kept"] and counts["corpus"]["tag_invalid"] == 0
    g = counts["guidance"]
    assert g["calls"] > 0 and g["malformed_ops"] == g["unstructured"] == g["unknown_pair_ids"] == 0 and g["rules"] > 0
    analysis = [r for r in StageStore(run_dir, "guidance").records() if r["kind"] == "guidance"]  # the gate's too
    assert analysis
    for record in analysis:
        c = record["completion"]
        assert "think_budget_hit" in c["flags"] and isinstance(json.loads(c["text"]), dict), record
    e = counts["eval"]
    assert e["judge_calls"] > 0 and e["judge_invalid_calls"] == 0
    assert set(e["truncated"]) >= {"strong", "student", "distill"} and not any(e["truncated"].values()), e  # answers
    assert e["seeker_calls"] > 0 and e["seeker_invalid_calls"] == 0

    # every training stage took its step; distill with the strong teacher across the two vocabularies
    for stage in ("sft", "dpo", "grpo", "distill"):
        assert counts[stage]["steps"] >= 1 and math.isfinite(counts[stage]["final_loss"]), (stage, counts[stage])
    d = StageStore(run_dir, "distill").manifest()
    assert d["data"]["teacher"] == "strong" and d["data"]["teacher_model"] == "r1-distill-qwen-7b-twin"
    assert d["training"]["teacher_calls"] >= 1 and all(math.isfinite(k) for k in d["training"]["kl"])
    assert counts["selftrain"]["trained_rounds"] == 1
    assert (run_dir / "report" / "index.html").stat().st_size > 0


def test_rehearsal_on_the_hf_engine_as_gpu_check_runs_it(twins, tmp_path):
    """`scripts/gpu_check.sh rehearse` runs the rehearsal with every role on the hf engine (no CUDA vLLM travels to
    a lent GPU): its generation stages, here at toy width, with the script's own flags. R1's answers come from the
    engine's two steps (the budget closes the think block, then the answer ends at the rehearsal's stop), so they
    are complete and become pairs; the guidance calls parse. A GPU's few minutes are not spent finding that out."""
    import re
    import shlex

    script = (repo_root() / "scripts" / "gpu_check.sh").read_text()
    hf = shlex.split(re.search(r"^HF=\((.*)\)$", script, re.M).group(1))
    assert hf.count("--set") == 3 and all(f"models.{r}.engine=hf" in hf for r in ("weak", "strong", "student"))
    from typer.testing import CliRunner

    from toushi.cli import app

    # the CLI in this process (no vLLM engine starts: every role is on the hf engine), as the subprocess would run it
    args = ["run", str(RECIPE), "--rehearse", "--set", f"run.dir={tmp_path}", *hf,
            "--set", "run.stages=[corpus,pairs,guidance,guided]"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, (done.output[-4000:], done.exception)
    run_dir = tmp_path / "r1-qwen-rehearsal"
    assert load_recipe(run_dir / "recipe.yaml", check_files=False).models.strong.engine == "hf"
    counts = {s: StageStore(run_dir, s).manifest()["counts"] for s in ("corpus", "pairs", "guidance", "guided")}
    assert counts["corpus"]["tagged"] == counts["corpus"]["kept"] > 0 and counts["corpus"]["tag_invalid"] == 0
    p = counts["pairs"]
    assert p["pairs"] == p["prompts"] and p["weak_truncated"] == p["strong_truncated"] == 0, p
    assert p["strong_think_budget_hit"] == p["strong_generated"] > 0
    g = counts["guidance"]
    assert g["calls"] > 0 and g["malformed_ops"] == g["unstructured"] == 0 and g["rules"] > 0, g
    assert counts["guided"]["guided_truncated"] == 0
    for record in StageStore(run_dir, "pairs").records():
        for _, c in completions(record):
            assert c["finish_reason"] == "stop" and "<think>" not in c["text"] and "</think>" not in c["text"], c


def test_rehearsal_transforms_the_loaded_recipe(twins, monkeypatch):
    """No rehearsal copy to drift: what the rehearsal does not scale is the shipped recipe's own, --set wins over
    the rehearsal, and a hub model without a twin is refused by name."""
    shipped = load_recipe(RECIPE)
    r = rehearse(shipped, overrides=["corpus.max_posts=3", "models.strong.thinking_budget=2"])
    assert r.run.name == "r1-qwen-rehearsal" and shipped.run.name == "r1-qwen"  # the loaded recipe is left as it was
    assert (r.corpus.max_posts, r.models.strong.thinking_budget) == (3, 2)
    for key in ("sft.lora", "dpo.beta", "dpo.guided_pairs", "grpo.reward_weights", "distill.beta", "distill.strong_reasoning",
                "guidance.mode", "eval.judge", "corpus.sources", "models.strong.sampling.temperature"):
        assert r.section_hash(key) == shipped.section_hash(key), key
    assert r.sft.train.max_steps == 1 and r.sft.train.accelerate_config is None and r.models.weak.kv_cache_gb == 0.25
    assert r.pairs.strong_sampling.stop == ["e"] and not r.models.strong.sampling.stop  # free text only, not JSON
    # every sampling samples the whole vocabulary at toy width (a random model's nucleus is most of it), none of
    # them at real width; the samplings the rehearsal adds (pairs' two, guided's) are among them
    import toushi.twins

    built = []  # the real-width twins are gigabytes of random weights, for a GPU: only their names are needed here
    monkeypatch.setattr(toushi.twins, "make_twin", lambda name, real_width=False: built.append((name, real_width)))
    toy, real = ([(key, value.top_p) for key, _, _, value in walk(x) if isinstance(value, Sampling)]
                 for x in (r, rehearse(shipped, width="real")))
    assert built and all(real_width for _, real_width in built)
    assert len(toy) == 13 and {p for _, p in toy} == {1.0}
    assert [k for k, _ in real] == [k for k, _ in toy] and min(p for _, p in real) < 1.0
    recipes = dict((key, value.top_p) for key, _, _, value in walk(shipped) if isinstance(value, Sampling))
    assert all(p == recipes[k] for k, p in real if k in recipes) and len(set(recipes) & {k for k, _ in real}) >= 10
    with pytest.raises(RecipeError, match="models.judge.name: meta-llama/Llama-3.1-8B has no twin"):
        rehearse(shipped.model_copy(update={"models": shipped.models.model_copy(update={
            "judge": shipped.models.weak.model_copy(update={"name": "meta-llama/Llama-3.1-8B"})})}))


@pytest.mark.slow
def test_rehearsal_serves_an_openai_role(twins, tmp_path):
    """A role the recipe reaches over HTTP is rehearsed through a local vLLM server serving its twin: R1's reasoning
    comes back split off (reasoning_content), the tags are constrained after </think>, the server is gone after."""
    import httpx

    cmd = [sys.executable, "-m", "toushi.cli", "run", str(RECIPE), "--rehearse", "--set", f"run.dir={tmp_path}",
           "--set", "run.stages=[corpus,pairs]", "--set", "models.strong.engine=openai",
           "--set", "models.strong.base_url=https://api.example.invalid/v1", "--set", "models.strong.api_key_env=NONE"]
    done = subprocess.run(cmd, cwd=repo_root(), env=os.environ, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "r1-qwen-rehearsal"
    saved = load_recipe(run_dir / "recipe.yaml", check_files=False)
    assert saved.models.strong.engine == "openai" and saved.models.strong.base_url.startswith("http://127.0.0.1:")
    assert saved.models.strong.api_key_env is None
    counts = StageStore(run_dir, "corpus").manifest()["counts"]
    assert counts["tagged"] == counts["kept"] and counts["tag_invalid"] == 0
    for record in StageStore(run_dir, "pairs").records():
        (c,) = record["strong"]
        assert "think_budget_hit" in c["flags"] and "</think>" not in c["text"] and c["text"], c
    with pytest.raises(httpx.HTTPError):
        httpx.get(saved.models.strong.base_url.removesuffix("/v1") + "/health", timeout=2.0)
