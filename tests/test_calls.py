"""toushi/calls.py, the one path for model calls: what its keys cover, raw outputs parsed on read, the retry.

The engine here is scripted: the cache is under test, not a model (the stages' tests run these calls on real
engines: test_guidance, test_corpus, test_labels, test_guided, test_grpo's judge reward on a vLLM server). The model
directories and adapters are real files.
"""

from __future__ import annotations

import shutil

from toushi.calls import Calls
from toushi.engines import cache_model, make_completion
from toushi.engines.adapters import adapter_fingerprint
from toushi.recipe import ModelSpec, Sampling
from toushi.store import StageStore


class Scripted:
    """Answers every conversation with ``text``; remembers what it was asked (with which adapter)."""

    def __init__(self, text: str = "fine"):
        self.text, self.asked = text, []

    def generate(self, conversations, sampling, lora_name=None, structured=None):
        loras = lora_name if isinstance(lora_name, list) else [lora_name] * len(conversations)
        self.asked += [(c[-1]["content"], a) for c, a in zip(conversations, loras)]
        return [[make_completion(self.text, finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                                 latency_s=0.0, model="scripted") for _ in range(sampling.n)] for _ in conversations]


def ask(c: str) -> list[dict]:
    return [{"role": "user", "content": c}]


def test_cache_keys_cover_weights_dtype_adapter_content(tmp_path, tiny_model):
    """A model directory edited in place, a dtype change and a retrained adapter of the same name each ask again
    exactly the calls they affect; the same inputs ask nothing."""
    from tests.conftest import make_lora_adapter

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    adapter = make_lora_adapter(model, tmp_path / "adapter", seed=0)
    store = StageStore(tmp_path, "calls")
    engine = Scripted()

    def run(dtype: str = "float32") -> list[tuple[str, str | None]]:
        spec = ModelSpec(name=str(model), engine="hf", dtype=dtype)
        calls = Calls(store, cache_model(spec), lambda: engine, Sampling(temperature=0.0, max_tokens=4),
                      kind="test", adapters={"a": adapter_fingerprint(adapter)})
        before = len(engine.asked)
        calls.generate([ask("base"), ask("tuned")], lora=[None, "a"])
        return engine.asked[before:]

    assert run() == [("base", None), ("tuned", "a")]
    assert run() == []  # all cached
    make_lora_adapter(model, adapter, seed=1)  # retrained under the same name and path
    assert run() == [("tuned", "a")]
    assert run("bfloat16") == [("base", None), ("tuned", "a")]
    with open(model / "config.json", "a") as f:  # the model's directory changed in place
        f.write("\n")
    assert run() == [("base", None), ("tuned", "a")]
    assert run() == []


def test_parser_fix_applies_to_cached_calls(tmp_path, monkeypatch):
    """The raw verdict is what is cached: a judge-score parser fixed after the calls were made reads them
    anew, with no model call (the scorer of a resumed run has no engine at all)."""
    from toushi import rewards
    from toushi.rewards import JUDGE_SAMPLING, JudgeScorer

    engine = Scripted("Rating: 8/10")  # a judge that ignores the "Score: N" format
    scorer = JudgeScorer(engine, JUDGE_SAMPLING, StageStore(tmp_path, "judge"), "judge|float32")
    assert scorer.scores(["I lost my job."], ["That sounds hard."]) == [None]
    assert len(engine.asked) == 2 and scorer.invalid == 1  # asked once more, still unreadable

    real = rewards.parse_score
    monkeypatch.setattr(rewards, "parse_score", lambda t: real(t.replace("Rating:", "Score:").split("/")[0]))
    fixed = JudgeScorer(None, JUDGE_SAMPLING, StageStore(tmp_path, "judge"), "judge|float32")
    assert fixed.scores(["I lost my job."], ["That sounds hard."]) == [(8 - 5.5) / 4.5]
    assert fixed.invalid == 0 and len(engine.asked) == 2


def test_samples_repeats_and_a_kill_between_batches(tmp_path):
    """n samples per call each have a key; the same call twice in one request is made once; a run stopped after
    its first batch has that batch on disk, and the rerun makes only the rest."""
    store = StageStore(tmp_path, "calls")

    class Dying(Scripted):
        def generate(self, conversations, sampling, **kw):
            if self.asked:
                raise KeyboardInterrupt("killed")
            return super().generate(conversations, sampling, **kw)

    sampling = Sampling(temperature=0.7, max_tokens=4, n=3)
    convs = [ask(f"post {i}") for i in range(4)]
    calls = Calls(store, "m", Dying, sampling, kind="test", batch_size=2)
    try:
        calls.generate(convs)
    except KeyboardInterrupt:
        pass
    assert len(store.records()) == 2 * 3  # the first batch's samples were flushed before the kill

    engine = Scripted()
    again = Calls(store, "m", lambda: engine, sampling, kind="test", batch_size=2)
    out = again.generate([*convs, convs[3]])
    assert [len(c) for c in out] == [3] * 5 and [a for a, _ in engine.asked] == ["post 2", "post 3"]
    assert len(store.records()) == 4 * 3 and again.stats.cached == 3  # two from disk, one repeat in the request


def test_every_call_kind_goes_through_calls(tmp_path, tiny_model, monkeypatch):
    """A run of every stage that calls a model (the corpus tagger, pairs, guidance with its acceptance gate,
    guided, eval's students, judge and seeker) and `toushi generate`, with the engine instrumented: every call
    it gets comes through toushi/calls.py, and every kind of call is seen there. (The random-weight tiny model:
    the call path is under test, not the answers.)"""
    from toushi.engines.hf_engine import HFEngine
    from toushi.generate import generate_from_recipe
    from toushi.paths import repo_root
    from toushi.recipe import Recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    kinds: set[str] = set()
    inside: list[str] = []
    outside: list[str] = []
    fill, generate = Calls._fill, HFEngine.generate

    def through_calls(self, *args, **kw):
        inside.append(self.kind)
        try:
            return fill(self, *args, **kw)
        finally:
            inside.pop()

    def watched(self, conversations, *args, **kw):
        if inside:
            kinds.add(inside[-1])
        else:
            outside.append(conversations[0][-1]["content"][:80])
        return generate(self, conversations, *args, **kw)

    monkeypatch.setattr(Calls, "_fill", through_calls)
    monkeypatch.setattr(HFEngine, "generate", watched)
    # answers end at their first space: short, and finished (a cut answer is no answer to learn from); many are
    # empty (a first token with a leading space), so 16 posts leave guidance a few complete pairs
    tiny = {"name": str(tiny_model), "engine": "hf", "dtype": "float32", "hf_batch_size": 8,
            "sampling": {"temperature": 1.0, "max_tokens": 8, "stop": [" "], "seed": 0}}
    short = {"temperature": 0.0, "max_tokens": 48, "seed": 0}
    recipe = Recipe.model_validate({
        "run": {"name": "calls", "dir": str(tmp_path / "runs"), "lang": "en",
                "stages": ["corpus", "pairs", "guidance", "guided", "eval"]},
        "models": {"weak": tiny, "strong": tiny, "student": tiny, "judge": tiny},
        "corpus": {"sources": [{"path": str(repo_root() / "data" / "venting_en.jsonl"), "format": "openings"}],
                   "per_scene": None, "max_posts": 16, "heldout_fraction": 0.13,
                   "tagging": {"enabled": True, "sampling": short}},
        "guidance": {"mode": "map-reduce", "batch_size": 4, "accept_gate": True, "dev_prompts": 1, "sampling": short},
        "eval": {"systems": ["weak", "strong", "guided", "student"], "judge_mode": "generate", "ladder": False,
                 "bootstrap": 10, "judge_sampling": short, "sampling": tiny["sampling"],
                 "simulate": {"enabled": True, "max_posts": 2, "sampling": short}},
    })
    assert set(run_stages(recipe, STAGES).values()) == {"ran"}
    counts, _ = generate_from_recipe(recipe, role="student")
    assert counts["generated"] == counts["prompts"] > 0
    assert outside == [], outside
    assert kinds >= {"tag", "weak", "strong", "guidance", "gate-answer", "judge", "guided", "student",
                     "seeker-feeling", "generate"}, kinds
