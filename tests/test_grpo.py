"""GRPO with rule rewards on CPU, and the judge reward against a real OpenAI-compatible server.

The GRPO run goes through `toushi run` (the runner launches train/grpo.py with accelerate, as the stage
does), on SmolLM2-135M with tiny sizes: 3 steps, 2 completions of at most 20 tokens per prompt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_datasets import HELDOUT, POSTS

from tests.conftest import SERVER_KEY_ENV, SERVER_MODEL
from toushi.store import StageStore


def write_corpus(run_dir: Path) -> Path:
    """The corpus stage's records for the test posts (what load_grpo reads): id, lang, scene, text, split."""
    with StageStore(run_dir, "corpus").writer() as w:
        for i, (post, *_answers) in enumerate(POSTS[:8]):
            w.write({"id": f"c{i:02d}", "lang": "en", "scene": "life", "text": post,
                     "split": "heldout" if i in HELDOUT else "train"})
    return run_dir


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, offline_model):
    import yaml

    from toushi.recipe import load_recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    root = tmp_path_factory.mktemp("grpo")
    run_dir = write_corpus(root / "runs" / "g")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "run": {"name": "g", "dir": str(run_dir.parent), "stages": ["grpo"]},
        "models": {"student": {"name": "smollm2-135m-instruct", "dtype": "float32"}},
        "grpo": {
            "reward_weights": {"format": 1.0, "repetition": 0.5, "length": 1.0},
            "num_generations": 2, "max_completion_length": 20, "temperature": 1.0,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                      "logging_steps": 1, "save_steps": 3, "lr_scheduler_type": "constant", "eval_fraction": 0.0},
        },
    }))
    outcome = run_stages(load_recipe(recipe_path), STAGES)
    assert outcome == {"grpo": "ran"}
    return run_dir, offline_model


def test_grpo_logs_finite_rewards_per_function(grpo_run):
    run_dir, _ = grpo_run
    m = json.loads((run_dir / "grpo" / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["data"]["train_examples"] == 8 - len(HELDOUT & set(range(8)))
    assert m["counts"]["steps"] == 3 and m["training"]["steps"] == 3
    rewards = m["training"]["rewards"]
    assert set(rewards) == {"reward", "rewards/format/mean", "rewards/repetition/mean", "rewards/length/mean"}
    for name, values in rewards.items():
        assert len(values) == 3, (name, values)  # logged at every step
        assert all(math.isfinite(v) for v in values), (name, values)
    # each rule reward lies in [-1, 1]; the total is their weighted sum
    for name in ("format", "repetition", "length"):
        assert all(-1.0 <= v <= 1.0 for v in rewards[f"rewards/{name}/mean"])
    total = [f + 0.5 * r + n for f, r, n in zip(rewards["rewards/format/mean"], rewards["rewards/repetition/mean"],
                                                rewards["rewards/length/mean"])]
    assert rewards["reward"] == pytest.approx(total, abs=1e-4)
    # the trainer's own log (checkpoint at step 3) has the same reward history
    state = json.loads((run_dir / "grpo" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["reward"] for h in state["log_history"] if "reward" in h] == pytest.approx(rewards["reward"])


def test_grpo_adapter_saved_trained_and_loadable(grpo_run):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, base_path = grpo_run
    adapter = run_dir / "grpo" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in weights.values())
    # lora_B starts at zero: a nonzero one means the policy gradient moved the adapter
    assert any(v.abs().sum() > 0 for v in lora_b)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(adapter))
    assert model.active_adapter == "default"


# ------------------------------------------------------------------------ judge reward, real server


class CountingEngine:
    """The real OpenAI engine, counting the requests it sends (one per conversation)."""

    def __init__(self, engine):
        self.engine, self.requests = engine, 0

    def generate(self, conversations, sampling, lora_name=None, **kwargs):
        self.requests += len(conversations)
        return self.engine.generate(conversations, sampling, lora_name, **kwargs)


def test_judge_reward_against_real_server_is_parsed_and_cached(vllm_server, tmp_path):
    from test_rewards import GOOD_EN, MARKDOWN_EN, SHORT_POST

    from toushi.engines import make_engine
    from toushi.recipe import ModelSpec, Sampling
    from toushi.rewards import JUDGE_SAMPLING, JudgeScorer, build_rewards, parse_score

    spec = ModelSpec(name=SERVER_MODEL, engine="openai", base_url=vllm_server, api_key_env=SERVER_KEY_ENV)
    engine = CountingEngine(make_engine(spec))
    cache = StageStore(tmp_path, "judge_cache")
    scorer = JudgeScorer(engine, JUDGE_SAMPLING, cache, spec.name)
    reward = scorer.as_reward("judge")
    completions = [[{"role": "assistant", "content": a}] for a in (GOOD_EN, MARKDOWN_EN, GOOD_EN)]
    first = reward(prompts=[None] * 3, completions=completions, post=[SHORT_POST] * 3, trainer_state=None)
    assert engine.requests == 2  # the repeated answer is asked once
    # decoded under the "Score: N" format, every verdict is a score: none is invalid
    assert len(first) == 3 and first[0] == first[2] and all(s is not None and -1.0 <= s <= 1.0 for s in first)
    records = cache.records()
    assert len(records) == 2  # one verdict per distinct (post, answer)
    for rec, value in zip(records, first):
        raw = rec["completion"]["text"]  # the judge's own words are kept, and parsed when read
        assert parse_score(raw) is not None and value == (parse_score(raw) - 5.5) / 4.5
    assert scorer.invalid == 0
    # second call: everything comes from the cache, no request reaches the server
    again = reward(prompts=[None] * 3, completions=completions, post=[SHORT_POST] * 3)
    assert again == first and engine.requests == 2
    # a fresh scorer (a resumed run) reads the cache from disk and needs no engine at all
    resumed = JudgeScorer(None, JUDGE_SAMPLING, StageStore(tmp_path, "judge_cache"),
                          spec.name)
    assert resumed.scores([SHORT_POST] * 2, [GOOD_EN, MARKDOWN_EN]) == first[:2]
    # build_rewards wires the same judge (and its cache under the stage dir) into GRPO's reward list
    funcs, weights = build_rewards({"format": 1.0, "judge": 0.5}, judge=spec, cache_dir=tmp_path)
    assert [f.__name__ for f in funcs] == ["format", "judge"] and weights == [1.0, 0.5]
    assert funcs[1](prompts=[None] * 3, completions=completions, post=[SHORT_POST] * 3) == first
    # adherence: the same answer judged against guidance is a different question, so it is asked anew
    adherence = JudgeScorer(engine, JUDGE_SAMPLING, cache, spec.name,
                            guidance="Name the feeling first; plain text.")
    assert len(adherence.scores([SHORT_POST], [GOOD_EN])) == 1 and engine.requests == 3
    assert len(StageStore(tmp_path, "judge_cache").records()) == 3
    # other decoding is another question too: its verdicts are not read from the greedy ones
    sampled = JudgeScorer(engine, Sampling(temperature=0.7, max_tokens=16, seed=1), cache, spec.name)
    assert len(sampled.scores([SHORT_POST], [GOOD_EN])) == 1 and engine.requests == 4
