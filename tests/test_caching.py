"""Honest caching: fingerprints cover content, retraining really retrains, --force cascades, and no engine
process outlives a killed `toushi run`.

Training uses the tiny random model (plumbing: which checkpoint is resumed, whether weights differ); the
orphan test kills a real `toushi run` while SmolLM2 generates in a real vLLM engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_datasets import write_run
from test_train import adapter_weights, manifest, train_in_process, write_recipe

from toushi.lifetime import descendants, proc_start
from toushi.paths import repo_root
from toushi.recipe import load_recipe, save_recipe
from toushi.runner import Stage, plan, run_stages
from toushi.stages import STAGES
from toushi.store import StageStore, read_jsonl, repair_jsonl

TINY_SFT = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 2, "max_length": 128,
                      "learning_rate": 1e-2, "eval_fraction": 0.0, "lr_scheduler_type": "constant"}}


def weights_differ(a: dict, b: dict) -> bool:
    return any((a[k] - b[k]).abs().max() > 0 for k in a if "lora_B" in k)


# ------------------------------------------------------------------------ training checkpoints


def test_changed_answers_retrain_from_scratch(tmp_path, tiny_model):
    run_dir = write_run(tmp_path / "runs" / "r")
    recipe = write_recipe(tmp_path / "r.yaml", run_dir, "tiny-random", sft=TINY_SFT)
    train_in_process("sft", recipe, "--resume")
    first = adapter_weights(run_dir / "sft" / "adapter")
    assert manifest(run_dir, "sft")["fresh"] == "no checkpoint to resume"

    # Nothing changed and that run had finished: its last checkpoint is reused, not trained again.
    train_in_process("sft", recipe, "--resume")
    m = manifest(run_dir, "sft")
    assert m["resumed_from"] is None and m["fresh"] is None and m["training"]["steps"] == 2
    assert m["reused"] == str(run_dir / "sft" / "checkpoints" / "checkpoint-2")
    assert not weights_differ(first, adapter_weights(run_dir / "sft" / "adapter"))

    # Same ids, other answer text: the old checkpoint must not be resumed.
    pairs = StageStore(run_dir, "pairs")
    records = pairs.records()
    for r in records:
        for c in r["strong"]:
            c["text"] = "I hear how heavy this is. You are not alone in it. " + c["text"]
    pairs.records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train_in_process("sft", recipe, "--resume")
    m = manifest(run_dir, "sft")
    assert m["resumed_from"] is None
    assert m["fresh"] == "checkpoints were made with other training examples", m["fresh"]
    assert m["training"]["steps"] == 2
    assert weights_differ(first, adapter_weights(run_dir / "sft" / "adapter"))


def test_changed_hparam_retrains(tmp_path, tiny_model):
    """Through `toushi run` (runner -> accelerate launch -> train/sft.py) once; then a new learning rate reruns
    the stage, and the script starts fresh instead of resuming the finished checkpoint. An edited input is seen by
    content (runner.plan asks why_rerun, the one place `toushi run` asks too), and undoing the edit undoes it."""
    run_dir = write_run(tmp_path / "runs" / "r")
    recipe_path = write_recipe(tmp_path / "r.yaml", run_dir, "tiny-random", sft=TINY_SFT)
    sft_only = ["run.stages=[sft]"]
    assert run_stages(load_recipe(recipe_path, sft_only), STAGES) == {"sft": "ran"}
    first = adapter_weights(run_dir / "sft" / "adapter")
    assert run_stages(load_recipe(recipe_path, sft_only), STAGES) == {"sft": "skipped"}

    # an input stage outside run.stages still counts by content: an edited pairs file reruns sft
    pairs = StageStore(run_dir, "pairs")
    original = pairs.records_path.read_text()
    records = pairs.records()
    records[0]["scene"] = "edited by hand"
    pairs.records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plan(load_recipe(recipe_path, sft_only), STAGES) == [("sft", "changed: pairs output")]
    pairs.records_path.write_text(original)
    assert plan(load_recipe(recipe_path, sft_only), STAGES) == [("sft", None)]

    # a new learning rate: the runner would rerun sft, and the script, asked to resume as the runner asks,
    # starts fresh. Trained in this process: the launch path is proven above, a second launch adds nothing.
    changed = load_recipe(recipe_path, [*sft_only, "sft.train.learning_rate=0.05"])
    assert plan(changed, STAGES) == [("sft", "changed: recipe settings")]
    train_in_process("sft", save_recipe(changed, tmp_path / "changed"), "--resume")
    m = manifest(run_dir, "sft")
    assert m["resumed_from"] is None
    assert m["fresh"] == "checkpoints were made with other settings (train.learning_rate)", m["fresh"]
    assert m["training"]["steps"] == 2
    assert weights_differ(first, adapter_weights(run_dir / "sft" / "adapter"))


def test_resume_after_interruption_continues(tmp_path, tiny_model):
    """An interrupted run (only checkpoint-2 of 4 on disk) resumes from it with its history."""
    run_dir = write_run(tmp_path / "runs" / "r")
    sft = {**TINY_SFT, "train": {**TINY_SFT["train"], "max_steps": 4}}
    recipe = write_recipe(tmp_path / "r.yaml", run_dir, "tiny-random", sft=sft)
    train_in_process("sft", recipe)
    ckpts = run_dir / "sft" / "checkpoints"
    shutil.rmtree(ckpts / "checkpoint-4")  # what a crash between step 2 and step 4 leaves
    train_in_process("sft", recipe, "--resume")
    m = manifest(run_dir, "sft")
    assert m["resumed_from"].endswith("checkpoint-2") and m["training"]["steps"] == 4
    state = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged[:2] == [1, 2] and logged[-1] == 4  # history carried over from the first run


# SIGKILL the training process the moment PEFT has written the final adapter's weights (into the temporary
# directory the save renames into place), before the tokenizer follows: a kill while the adapter is saved.
KILL_DURING_ADAPTER_SAVE = """
import os, runpy, signal, sys
from peft import PeftModel
save = PeftModel.save_pretrained
def save_then_die(self, save_directory, *a, **k):
    save(self, save_directory, *a, **k)
    if ".adapter.tmp-" in str(save_directory):  # not a checkpoint's save
        os.kill(os.getpid(), signal.SIGKILL)
PeftModel.save_pretrained = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_after_last_step_keeps_adapter(tmp_path, tiny_model, capsys):
    """A real training process SIGKILLed after its last step, while it saves the adapter: the half-written
    adapter never counts (an older one left in place by an in-place save does not either), and the rerun
    reuses the final checkpoint, trains nothing, and ends with a complete adapter equal to that checkpoint."""
    from toushi.engines.adapters import complete_adapter, run_adapters
    from toushi.runner import present_outputs
    from toushi.stages import STAGES

    run_dir = write_run(tmp_path / "runs" / "r")
    recipe = write_recipe(tmp_path / "r.yaml", run_dir, "tiny-random", sft=TINY_SFT)
    adapter = run_dir / "sft" / "adapter"
    adapter.mkdir(parents=True)  # what an in-place save killed half-way left: a config and torn weights
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    sft_stage = next(s for s in STAGES if s.name == "sft")
    assert not complete_adapter(adapter) and run_adapters(run_dir) == {} and present_outputs(run_dir, sft_stage) == []

    proc = subprocess.run([sys.executable, "-c", KILL_DURING_ADAPTER_SAVE, str(repo_root() / "train" / "sft.py"),
                           "--recipe", str(recipe), "--resume"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = run_dir / "sft" / "checkpoints" / "checkpoint-2"
    assert (last / "trainer_state.json").exists()
    assert [p.name for p in (run_dir / "sft").glob(".adapter.tmp-*")], "the kill should land inside the save"
    assert not complete_adapter(adapter) and run_adapters(run_dir) == {}  # still the torn old one, never used
    assert "training" not in (manifest(run_dir, "sft") if (run_dir / "sft" / "manifest.json").exists() else {})

    capsys.readouterr()
    train_in_process("sft", recipe, "--resume")
    printed = capsys.readouterr().out
    assert f"[toushi] reusing {last}: checkpoint-2 finished training (step 2 of 2)" in printed
    assert "{'loss'" not in printed and "{'train_runtime'" not in printed  # no training step was taken
    m = manifest(run_dir, "sft")
    assert m["reused"] == str(last) and m["resumed_from"] is None and m["training"]["steps"] == 2
    assert m["training"]["train_runtime_s"] is None and m["training"]["final_loss"] is not None
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert complete_adapter(adapter) and run_adapters(run_dir) == {"sft": adapter}
    assert present_outputs(run_dir, sft_stage) == ["adapter"]
    assert not weights_differ(adapter_weights(last), adapter_weights(adapter))
    assert [p.name for p in (run_dir / "sft").iterdir() if p.name.startswith(".adapter")] == []


# ------------------------------------------------------------------------ stage fingerprints


def _writer(name: str):
    """A stage that records its upstream's values (+1), so reruns are visible in the records."""
    def run(ctx):
        src = [r["value"] for r in ctx.stage(UPSTREAM[name]).records()] if name in UPSTREAM else [1, 2]
        ctx.store.records_path.unlink(missing_ok=True)
        with ctx.store.writer() as w:
            for i, v in enumerate(src):
                w.write({"id": f"{name}{i}", "value": v + 1})
        RAN.append(name)
        return {"records": len(src)}
    return run


RAN: list[str] = []
UPSTREAM = {"pairs": "corpus", "guidance": "pairs"}
CHAIN = [Stage("corpus", _writer("corpus"), ("run.seed",)),
         Stage("pairs", _writer("pairs"), ("pairs",), ("corpus",)),
         Stage("guidance", _writer("guidance"), ("guidance",), ("pairs",)),
         Stage("guided", _writer("guided"), ("guided",), ())]


def test_force_cascades_downstream(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": "t", "dir": str(tmp_path / "runs"),
                                         "stages": ["corpus", "pairs", "guidance", "guided"]}}))
    recipe = load_recipe(p)
    run_stages(recipe, CHAIN)
    RAN.clear()
    out = run_stages(recipe, CHAIN, force={"pairs"})
    # pairs and what reads from it rerun; corpus (upstream) and guided (reads nothing of it) do not
    assert out == {"corpus": "skipped", "pairs": "ran", "guidance": "ran", "guided": "skipped"}
    assert RAN == ["pairs", "guidance"]
    assert "--force pairs: rerunning pairs, guidance (guidance read from it)" in capsys.readouterr().err
    # a hand edit of an upstream stage's output reruns what reads it
    RAN.clear()
    corpus = StageStore(recipe.run_dir, "corpus")
    corpus.records_path.write_text(json.dumps({"id": "corpus0", "value": 10}) + "\n")
    assert run_stages(recipe, CHAIN) == {"corpus": "skipped", "pairs": "ran", "guidance": "ran",
                                         "guided": "skipped"}
    assert [r["value"] for r in StageStore(recipe.run_dir, "guidance").records()] == [12]
    assert StageStore(recipe.run_dir, "pairs").manifest()["rerun_reason"] == "changed: corpus output"


def test_edited_input_file_reruns_stage(tmp_path):
    """The real corpus stage: an in-place edit of its data file reruns it; a touch without change does not."""
    data = tmp_path / "posts.jsonl"
    shutil.copy(repo_root() / "data" / "venting_en.jsonl", data)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["corpus"]},
        "corpus": {"sources": [{"path": str(data), "format": "openings"}], "per_scene": None},
    }))
    recipe = load_recipe(p)
    assert run_stages(recipe, STAGES) == {"corpus": "ran"}
    assert run_stages(recipe, STAGES) == {"corpus": "skipped"}
    os.utime(data, (time.time() + 5, time.time() + 5))  # same bytes, new mtime: content decides
    assert run_stages(recipe, STAGES) == {"corpus": "skipped"}

    lines = data.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["text"] = "My landlord gave me two weeks to move out and I have nowhere to go. I can't sleep."
    data.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    assert run_stages(recipe, STAGES) == {"corpus": "ran"}
    m = StageStore(recipe.run_dir, "corpus").manifest()
    assert m["rerun_reason"] == "changed: file corpus.sources.0.path"
    texts = [r["text"] for r in StageStore(recipe.run_dir, "corpus").records()]
    assert first["text"] in texts


def test_edited_guidance_file_reruns_guided(tmp_path, tiny_model):
    """A hand-edited guidance file (guidance.edited_file) edited again in place: guidance and guided rerun,
    and the weak model's new system prompts carry the new rule."""
    from test_guided import GUIDANCE
    from test_guided import write_run as write_guided_run

    run_dir = tmp_path / "runs" / "t"
    write_guided_run(run_dir)
    edited = tmp_path / "my_guidance.json"
    edited.write_text(json.dumps(GUIDANCE), encoding="utf-8")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["guidance", "guided"]},
        "models": {"weak": {"name": str(tiny_model), "engine": "hf", "dtype": "float32",
                            "sampling": {"temperature": 0.0, "max_tokens": 4}}},
        "guidance": {"edited_file": str(edited)},
    }))
    recipe = load_recipe(p)
    assert run_stages(recipe, STAGES) == {"guidance": "ran", "guided": "ran"}
    assert run_stages(recipe, STAGES) == {"guidance": "skipped", "guided": "skipped"}

    new_rule = "Never tell the person to calm down"
    g = json.loads(edited.read_text())
    g["dimensions"][0]["rules"].append({"text": new_rule, "support": 1, "pair_ids": ["g2"]})
    edited.write_text(json.dumps(g), encoding="utf-8")
    assert run_stages(recipe, STAGES) == {"guidance": "ran", "guided": "ran"}
    records = StageStore(run_dir, "guided").records()
    assert records and all(new_rule in r["system"] for r in records), records[0].keys()


# ------------------------------------------------------------------------ engine processes


def _write_pairs_recipe(tmp_path: Path) -> Path:
    spec = {"name": "smollm2-135m-instruct", "engine": "vllm", "enforce_eager": True, "max_model_len": 1024,
            "kv_cache_gb": 0.25, "dtype": "float32", "sampling": {"temperature": 0.7, "max_tokens": 24, "seed": 0}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "run": {"name": "orphan", "dir": str(tmp_path / "runs"), "stages": ["corpus", "pairs"]},
        "models": {"weak": spec, "strong": spec},
        "corpus": {"sources": [{"path": str(repo_root() / "data" / "venting_en.jsonl"), "format": "openings"}],
                   "per_scene": None, "max_posts": 6},  # 6 batches a role: room to kill mid-way, short rerun
        "pairs": {"batch_size": 1},
    }))
    return p


def alive(procs: dict[int, int]) -> dict[int, int]:
    """Those of ``procs`` (pid -> start time) still running: a reused pid is another process."""
    return {pid: st for pid, st in procs.items() if proc_start(pid) == st}


def start_run(recipe: Path, log: Path, **env: str) -> subprocess.Popen:
    """A real `toushi run RECIPE` in a session of its own (a kill of its group takes what it started along),
    its stderr in ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_LOGGING_LEVEL": "WARNING", **env}
    return subprocess.Popen([sys.executable, "-m", "toushi.cli", "run", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def note_descendants(pid: int, seen: dict[int, int]) -> None:
    """Add the processes below ``pid`` now to ``seen`` (pid -> start time)."""
    for sub in descendants(pid):
        st = proc_start(sub)
        if st is not None:
            seen[sub] = st


def test_no_orphan_engine_after_sigkill(tmp_path, offline_model):
    """SIGKILL a real `toushi run` while a vLLM engine with its own processes generates: nothing it started
    may survive."""
    recipe = _write_pairs_recipe(tmp_path)
    cache = tmp_path / "runs" / "orphan" / "pairs" / "weak_cache" / "records.jsonl"
    # vLLM's own process layout (an engine-core process and its worker), as on a GPU: on a CPU toushi keeps the
    # engine in its process unless this is set, and then a SIGKILL takes the engine with it by itself
    proc = start_run(recipe, tmp_path / "first.log", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    seen: dict[int, int] = {}
    try:
        deadline = time.time() + 300
        # wait until the engine is generating: some batches of weak answers are on disk
        while time.time() < deadline and proc.poll() is None:
            note_descendants(proc.pid, seen)
            if cache.exists() and len(cache.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert cache.exists(), "the engine never produced a batch"
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in alive(seen)}
        assert any(n.startswith("VLLM::EngineCor") for n in names), names  # comm is cut at 15 chars
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and alive(seen):
            time.sleep(0.5)
        assert not alive(seen), f"left running 30 s after SIGKILL: {alive(seen)}"
    finally:  # never leave a run or an engine behind, even when the test fails
        if proc.poll() is None:
            proc.kill()
        for pid in alive(seen):
            os.kill(pid, signal.SIGKILL)

    # the killed run's engine output went to the stage's log, not to the terminal (quiet)
    run_dir = tmp_path / "runs" / "orphan"
    assert "EngineCore" in (run_dir / "pairs" / "engine.log").read_text()
    assert "EngineCore" not in (tmp_path / "first.log").read_text()

    # what the killed run wrote is there for a rerun, as the rerun reads it (a torn last line dropped): the
    # batches seen before the kill, no prompt twice. That a rerun continues from such records and generates
    # nothing twice is test_chaos's (kills in pairs, sft and eval, each rerun to the end): rerunning here would
    # load vLLM again for nothing this test adds.
    repair_jsonl(cache)
    ids = [r["id"] for r in read_jsonl(cache)]
    assert len(ids) >= 2 and len(ids) == len(set(ids)), ids  # 3 lines seen: at least 2 whole

