"""Self-training on CPU: one round end to end through `toushi run` (which launches train/selftrain.py with
accelerate; the module's fixture) on SmolLM2-135M (3 prompts x 2 samples of at most 64 tokens, ended at a blank line, 2 SFT steps), the
tau filter, resume by round, and the judge's confidence through an OpenAI endpoint the trainer's process calls
(the same scorer against a real vLLM server: test_grpo's judge reward test).

The other runs call the script's main() in this process, as test_train does for every trainer but the launched one:
a launch costs its process about 40 s of imports here, and the launch path is the fixture's.

The run's pairs (+ guided) records come from test_datasets.write_run; there is no SFT adapter, so
round 1 samples from the base model with a fresh LoRA.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_datasets import write_run
from test_train import train_in_process

from toushi.engines.openai_engine import STRUCTURED_RETRIES


def write_recipe(path: Path, run_dir: Path, **selftrain) -> Path:
    base = {
        "rounds": 1, "samples_per_prompt": 2, "max_prompts": 3, "temperature": 0.8, "tau": -100.0,
        # SmolLM2 seldom ends a turn by itself this soon; a paragraph's end is an end, and most answers reach it
        # within 64 tokens (a cut-off answer is never kept, so a round with none finished would not train)
        "max_new_tokens": 64, "stop": ["\n\n"],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256, "learning_rate": 1e-3,
                  "logging_steps": 1, "save_steps": 100, "lr_scheduler_type": "constant"},
    }
    path.write_text(yaml.safe_dump({
        "run": {"name": run_dir.name, "dir": str(run_dir.parent), "stages": ["selftrain"]},
        "models": {"student": {"name": "smollm2-135m-instruct", "dtype": "float32"}},
        "selftrain": {**base, **selftrain},
    }))
    return path


def run(recipe_path: Path, *overrides: str) -> dict:
    from toushi.recipe import load_recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    return run_stages(load_recipe(recipe_path, list(overrides)), STAGES)


def train(recipe_path: Path, *overrides: str) -> None:
    """train/selftrain.py's main() in this process, with --resume as `toushi run` passes it."""
    train_in_process("selftrain", recipe_path, "--resume", *(a for o in overrides for a in ("--set", o)))


def rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "selftrain" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "selftrain" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def selftrained(tmp_path_factory, offline_model):
    root = tmp_path_factory.mktemp("selftrain")
    run_dir = write_run(root / "runs" / "st")
    recipe_path = write_recipe(root / "recipe.yaml", run_dir)
    assert run(recipe_path) == {"selftrain": "ran"}
    return run_dir, recipe_path, offline_model


def test_round_recorded_with_counts(selftrained):
    run_dir, _, _ = selftrained
    (rec,) = rounds(run_dir)
    assert rec["round"] == 1 and rec["adapter_in"] is None  # no SFT adapter: a fresh LoRA
    assert rec["prompts"] == 3 and rec["samples"] == 6 and rec["kept"] + rec["rejected"] == 6
    samples = [json.loads(x) for x in (run_dir / "selftrain" / "rounds" / "1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    for s in samples:
        assert s["confidence"] < 0 and 0 < s["tokens"] <= 64
        assert s["kept"] == (s["rejected"] == [])
        assert "confidence" not in s["rejected"]  # tau = -100 lets every confidence through
        # a cut-off answer is never kept; a finished one ended before the budget, cut before the blank line
        assert ("truncated" in s["rejected"]) == (not s["finished"])
        assert "\n\n" not in s["text"]
    assert rec["rejected_by"]["truncated"] == sum(not s["finished"] for s in samples)
    kept = [s for s in samples if s["kept"]]
    assert kept and all(s["finished"] for s in kept)
    assert rec["kept"] == sum(s["kept"] for s in samples) > 0
    assert rec["rejected_by"]["format"] == sum("format" in s["rejected"] for s in samples)
    assert rec["mean_confidence"] == pytest.approx(sum(s["confidence"] for s in samples) / 6, abs=1e-3)
    # trained on the SFT set (11 strong answers after drops) plus the kept answers
    assert rec["trained"] and rec["train_examples"] == 11 + rec["kept"]
    assert rec["training"]["steps"] == 2 and rec["train_loss"] > 0
    m = manifest(run_dir)
    assert m["status"] == "complete" and m["counts"]["rounds"] == 1 and m["counts"]["kept"] == rec["kept"]
    assert m["rounds"][0]["kept"] == rec["kept"] and m["adapter"].endswith("selftrain/adapter")


def test_adapter_saved_trained_and_loadable(selftrained):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, _, base_path = selftrained
    adapter = run_dir / "selftrain" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # lora_B starts at zero
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(adapter))
    assert model.active_adapter == "default"
    # eval finds it like the other students
    from toushi.engines.adapters import run_adapters

    assert run_adapters(run_dir, ["sft", "selftrain"]) == {"selftrain": adapter}


def test_high_tau_keeps_nothing_and_does_not_train(tmp_path, offline_model):
    run_dir = write_run(tmp_path / "runs" / "strict")
    # mean log-probs are <= 0, so tau = 0 rejects every answer on confidence
    recipe_path = write_recipe(tmp_path / "strict.yaml", run_dir, tau=0.0, max_prompts=2, max_new_tokens=8)
    train(recipe_path)
    (rec,) = rounds(run_dir)
    assert rec["kept"] == 0 and rec["rejected"] == 4 and rec["rejected_by"]["confidence"] == 4
    assert not rec["trained"] and rec["train_loss"] is None and rec["adapter_out"] is None
    assert rec["mean_confidence_kept"] is None and rec["mean_confidence"] < 0
    m = manifest(run_dir)
    assert m["data"]["trained_rounds"] == 0 and m["adapter"] is None
    assert not (run_dir / "selftrain" / "adapter").exists()


def test_finished_round_is_not_redone(selftrained):
    run_dir, recipe_path, _ = selftrained
    first = rounds(run_dir)[0]
    samples_1 = (run_dir / "selftrain" / "rounds" / "1" / "samples.jsonl").read_bytes()
    # two rounds now: round 1 is reused as is, round 2 samples from round 1's adapter
    train(recipe_path, "selftrain.rounds=2")
    recs = rounds(run_dir)
    assert [r["round"] for r in recs] == [1, 2] and recs[0] == first
    assert (run_dir / "selftrain" / "rounds" / "1" / "samples.jsonl").read_bytes() == samples_1
    assert recs[1]["adapter_in"] == first["adapter_out"]
    assert manifest(run_dir)["data"]["rounds"] == 2


# ------------------------------------------------------------------------ judge-score confidence


def test_verdict_by_logprob_or_judge():
    from toushi.selftrain import verdict

    post = "I failed my driving test again today."
    a = {"text": "That sounds really discouraging.", "confidence": -0.8, "finished": True}
    assert verdict(a, post, tau=-1.0) == []
    assert verdict(a, post, tau=-0.5) == ["confidence"]
    assert verdict({**a, "finished": False}, post, tau=-1.0) == ["truncated"]
    assert verdict({**a, "finished": False, "judge_score": 10}, post, judge_tau=0.5) == ["truncated"]
    assert verdict({**a, "text": "**Hang in there.**"}, post) == ["format"]
    # judge scores 1-10 map to [-1, 1]; judge_tau 0.5 needs 8 or more, and log-prob is not consulted
    assert verdict({**a, "judge_score": 8}, post, judge_tau=0.5) == []
    assert verdict({**a, "judge_score": 7}, post, judge_tau=0.5) == ["judge"]
    assert verdict({**a, "judge_score": None}, post, judge_tau=0.5) == ["judge_invalid"]
    assert verdict(a, post, judge_tau=0.5) == []  # not judged (yet): only the cheap checks


def test_answer_ends_at_end_of_turn_or_stop_string(offline_model):
    from transformers import AutoTokenizer

    from toushi.selftrain import answer_end

    tok = AutoTokenizer.from_pretrained(offline_model)
    eos, lead = {tok.eos_token_id}, "assistant\n"
    ids = tok.encode("That hurts.\n\nAlso, try this.", add_special_tokens=False)
    # a blank line ends the answer: the text stops before it, the tokens at the one that completed it
    text, tokens, finished = answer_end(tok, ids, eos, ["\n\n"], lead)
    assert (text, finished) == ("That hurts.", True)
    assert "\n\n" in tok.decode(ids[:tokens]) and "\n\n" not in tok.decode(ids[: tokens - 1])
    # no stop string: the same tokens ran to the budget (not finished) or to the end-of-turn token (finished)
    assert answer_end(tok, ids, eos, [], lead) == ("That hurts.\n\nAlso, try this.", len(ids), False)
    assert answer_end(tok, ids + [tok.eos_token_id, tok.eos_token_id], eos, [], lead)[1:] == (len(ids) + 1, True)
    # generate() also stops on a blank line that began in the prompt ("assistant\n" + "\n..."): the answer was
    # cut after its first token, whatever padding (the end-of-turn token here) follows
    first = tok.encode("\nI", add_special_tokens=False)
    assert tok.decode(first[:1]).startswith("\n")
    assert answer_end(tok, first[:1] + [tok.eos_token_id] * 3, eos, ["\n\n"], lead)[1:] == (1, False)


class ScriptedJudge(BaseHTTPRequestHandler):
    """Stands in for a remote judge API (models.judge is an endpoint by default), an OpenAI chat endpoint on
    loopback that the trainer's process calls, one that cannot enforce the score's format: answers each new
    question with the next scripted verdict, and the same question again (the engine's follow-ups asking for the
    format, the call layer's one retry of an unreadable verdict) with the same one, counting requests."""

    verdicts: list[str] = []
    said: dict[str, str] = {}
    requests: Counter = Counter()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        asked = body["messages"][0]["content"]  # the question; a follow-up adds turns after it
        assert "Score" in asked  # the judge_score rubric template
        cls = ScriptedJudge
        with LOCK:
            text = cls.said.setdefault(asked, cls.verdicts[len(cls.said) % len(cls.verdicts)])
            cls.requests[asked] += 1
        data = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


LOCK = threading.Lock()  # the engine asks several questions at once


@pytest.fixture
def scripted_judge():
    ScriptedJudge.verdicts, ScriptedJudge.said = ["Score: 9", "Score: 4", "I cannot rate this."], {}
    ScriptedJudge.requests = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_confidence_keeps_high_scores_and_caches_verdicts(tmp_path, offline_model, scripted_judge, capfd):
    judge = ScriptedJudge
    run_dir = write_run(tmp_path / "runs" / "judged")
    # 4 prompts: enough finished answers for the judge to give each scripted verdict at least once
    recipe_path = write_recipe(tmp_path / "judged.yaml", run_dir, confidence="judge", judge_tau=0.5, max_prompts=4,
                               tau=0.0)  # tau 0 would reject everything: it is not used with the judge
    data = yaml.safe_load(recipe_path.read_text())
    data["models"]["judge"] = {"name": "remote-judge", "engine": "openai", "base_url": scripted_judge}
    recipe_path.write_text(yaml.safe_dump(data))
    train(recipe_path)
    (rec,) = rounds(run_dir)
    samples = [json.loads(x) for x in (run_dir / "selftrain" / "rounds" / "1" / "samples.jsonl").read_text().splitlines()]
    judged = [s for s in samples if "judge_score" in s]
    assert len(judged) >= 3
    # only answers that passed the cheap checks (format, finished) were sent to the judge, each once
    cheap = {"format", "truncated"}
    assert len(judge.said) == rec["judged"] == len(judged) == sum(not cheap & set(s["rejected"]) for s in samples) > 0
    unreadable = sum(s["judge_score"] is None for s in judged)
    # a readable verdict is asked once; an unreadable one, with the engine's follow-ups asking for the format,
    # then once more by the call layer (with its follow-ups), no more
    asked = sorted(judge.requests[q] for q in judge.said)
    assert asked == sorted(1 if v.startswith("Score") else 2 * (1 + STRUCTURED_RETRIES) for v in judge.said.values())
    requests = judge.requests.total()
    # each answer got the verdict its question was given (the engine asks several at once: any order)
    said = {next(q for q in judge.said if f"<<<REPLY\n{s['text']}\nREPLY>>>" in q): s for s in judged}
    assert len(said) == len(judged)
    assert all(s["judge_score"] == {"Score: 9": 9, "Score: 4": 4}.get(judge.said[q]) for q, s in said.items())
    assert {s["judge_score"] for s in judged} == {9, 4, None}
    for s in judged:
        want = [] if s["judge_score"] == 9 else ["judge"] if s["judge_score"] == 4 else ["judge_invalid"]
        assert s["rejected"] == want
    assert rec["rejected_by"]["confidence"] == 0 and rec["kept"] == sum(s["judge_score"] == 9 for s in judged)
    assert rec["rejected_by"]["judge_invalid"] == sum(s["judge_score"] is None for s in judged)
    assert rec["trained"] and rec["train_examples"] == 11 + rec["kept"]
    cache = [json.loads(x) for x in (run_dir / "selftrain" / "judge_cache" / "records.jsonl").read_text().splitlines()]
    assert len(cache) == len(judged) + unreadable  # every call kept: the verdicts and the retries
    # an interrupted round is redone with the same seed: the same answers, every verdict from the cache, and
    # its training reuses the checkpoint of the same fingerprint
    (run_dir / "selftrain" / "rounds.jsonl").write_text("")
    (run_dir / "selftrain" / "manifest.json").unlink()
    capfd.readouterr()
    train(recipe_path)
    assert judge.requests.total() == requests and rounds(run_dir)[0]["kept"] == rec["kept"]
    assert "nothing to train" in "".join(capfd.readouterr())
    redone = rounds(run_dir)[0]["training"]
    assert redone["reused"] and redone["steps"] == 2 and redone["final_loss"] == rec["training"]["final_loss"]
    assert manifest(run_dir)["data"]["kept"] == rec["kept"]


def test_rounds_belong_to_the_students_weights_template_and_judge(tmp_path, tiny_model):
    """Finished rounds are kept by their setting's key, and a student directory merged again in place, a chat
    template file edited in place or another judge is another setting (every round redone); the same inputs give
    the same key."""
    import shutil

    from toushi.recipe import load_recipe
    from toushi.selftrain import round_key

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "runs" / "k", train={"chat_template": str(template)})
    data = yaml.safe_load(path.read_text())
    data["models"]["student"]["name"] = str(model)
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    prompts, sft = [{"id": "p1", "prompt": "hi", "post": "hi"}], [{"id": "s1", "messages": []}]

    def key(judge=None):
        return round_key(recipe, str(model), prompts, sft, None, judge)

    first = key()
    assert key() == first
    with open(model / "config.json", "a") as f:  # the student's directory changed in place
        f.write("\n")
    second = key()
    assert second != first
    template.write_text(template.read_text() + "\n")  # the template file edited in place
    third = key()
    assert third != second
    from toushi.recipe import ModelSpec

    judge = ModelSpec(name=str(model), engine="hf", dtype="float32")
    assert key(judge) != third and key(judge) != key(judge.model_copy(update={"dtype": "bfloat16"}))
