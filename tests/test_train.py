"""Real LoRA / QLoRA training on CPU: SFT and DPO through `toushi run` (accelerate launch), QLoRA.
(Resume and retraining: tests/test_caching.py; two-process DDP and FSDP2: tests/test_sharded_save.py.)

The run's pairs + guided records come from test_datasets.write_run (16 prompts, 3 held out), so these
tests do not depend on the pairs stage. SmolLM2-135M-Instruct for quality checks (loss falls, outputs
change); the tiny random model for plumbing (QLoRA, DDP, resume).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_datasets import write_run

from toushi.paths import repo_root

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def write_recipe(path: Path, run_dir: Path, student: str, **sections) -> Path:
    data = {"run": {"name": run_dir.name, "dir": str(run_dir.parent), "stages": ["sft", "dpo"]},
            "models": {"student": {"name": student}}, **sections}
    path.write_text(yaml.safe_dump(data))
    return path


def launch(script: str, recipe: Path, *extra: str, config: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(repo_root() / "recipes" / "accelerate" / config)] if config else [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(repo_root() / "train" / f"{script}.py"), "--recipe", str(recipe), *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_script(script: str):
    """train/<script>.py as a module, loaded as `accelerate launch` would run it, minus its `__main__` block."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"train_{script}", repo_root() / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_in_process(script: str, recipe: Path, *extra: str) -> None:
    """Run a training script's main() in this process (one process, no launcher start-up cost)."""
    train_script(script).main(["--recipe", str(recipe), *extra])


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def adapter_weights(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


# ------------------------------------------------------------------------ SmolLM2: SFT then DPO


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, offline_model):
    """SFT then DPO on SmolLM2: sft through `toushi run` (the runner launches train/sft.py with accelerate), dpo
    by its script's main() in this process. One launch proves the launch path (the same for every script); a
    second would add half a minute of imports and nothing else."""
    from toushi.recipe import load_recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    root = tmp_path_factory.mktemp("train")
    run_dir = write_run(root / "runs" / "smol")
    # two packed rows a step: SFT's 6 steps see 2,280 tokens (16 s of training run alone on the AVX512-BF16 kind,
    # against 33 s at four rows) and its loss still falls by a quarter, in bf16 there and in fp32 on the AVX2 code
    # paths (scripts/avx2_emulation) alike
    train = {"per_device_train_batch_size": 2, "max_length": 256, "logging_steps": 1, "save_steps": 100,
             "lr_scheduler_type": "constant", "eval_fraction": 0.1}
    recipe_path = write_recipe(
        root / "recipe.yaml", run_dir, "smollm2-135m-instruct",
        sft={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "packing": True,
             "train": {**train, "max_steps": 6, "learning_rate": 1e-3, "gradient_checkpointing": "auto"}},
        dpo={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "beta": 0.1,
             "train": {**train, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                       "largest_micro_batch": True, "max_steps": 4, "learning_rate": 5e-4}},
    )
    assert run_stages(load_recipe(recipe_path, ["run.stages=[sft]"]), STAGES) == {"sft": "ran"}
    train_in_process("dpo", recipe_path)
    return run_dir, offline_model


def test_sft_loss_falls_and_manifest_has_counts(trained_run):
    run_dir, _ = trained_run
    m = manifest(run_dir, "sft")
    assert m["status"] == "complete"
    assert m["data"]["examples"] == 11 and m["data"]["heldout_excluded"] == 3
    assert m["data"]["dropped"] == {"strong_markdown": 1, "strong_empty": 1}
    assert m["counts"]["examples"] == 11  # what the runner got back from launch
    # packed padding-free: the 10 training examples share fewer rows of max_length 256
    assert m["data"]["train_examples"] == 10 and 2 <= m["data"]["train_rows"] < 10, m["data"]
    t = m["training"]
    assert t["steps"] == 6
    assert math.isfinite(t["first_loss"]) and math.isfinite(t["final_loss"]) and math.isfinite(t["eval_loss"])
    assert t["final_loss"] < t["first_loss"] * 0.9, t
    assert t["tokens_per_s"] > 0 and t["peak_memory_gib"] > 0
    # one launched process uses every core it may (accelerate alone would pin it to one thread)
    assert t["torch_threads"] == int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    # bf16 left to the device: on a CPU, what the manifest's CPU record says `auto` picks there
    assert t["bf16"] == (m["cpu"]["auto_precision"] == "bfloat16")
    # gradient_checkpointing: auto was decided in the trainer by the plan (SmolLM2 fits this RAM) and saved
    saved = yaml.safe_load((run_dir / "sft" / "recipe.yaml").read_text())
    assert saved["sft"]["train"]["gradient_checkpointing"] is False
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["sft"]["train"]["gradient_checkpointing"] == "auto"
    assert any((run_dir / "sft" / "tensorboard").iterdir())


def test_sft_adapter_is_plain_lora_and_changes_outputs(trained_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, base_path = trained_run
    adapter = run_dir / "sft" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and not cfg.get("modules_to_save")
    weights = adapter_weights(adapter)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: nonzero means it trained

    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "I failed my exam."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3


def test_dpo_loss_falls_and_adapter_saved(trained_run):
    run_dir, _ = trained_run
    m = manifest(run_dir, "dpo")  # what the script wrote (the runner's status is the sft test's)
    assert m["training"]["steps"] == 4
    assert m["data"]["by_kind"] == {"strong>weak": 11}
    t = m["training"]
    assert abs(t["first_loss"] - math.log(2)) < 0.02  # policy == reference at step 1
    assert t["final_loss"] < t["first_loss"], t
    assert t["final_reward_margin"] > 0
    # largest_micro_batch: the step's 2 x 2 pairs fit this RAM as one micro-batch of 4; the trainer ran that split
    # and saved it, the run's recipe keeps what was asked
    assert (t["micro_batch"], t["accumulation"]) == (4, 1), t
    saved = yaml.safe_load((run_dir / "dpo" / "recipe.yaml").read_text())["dpo"]["train"]
    assert (saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]) == (4, 1)
    asked = yaml.safe_load((run_dir / "recipe.yaml").read_text())["dpo"]["train"]
    assert (asked["per_device_train_batch_size"], asked["gradient_accumulation_steps"]) == (2, 2)
    weights = adapter_weights(run_dir / "dpo" / "adapter")
    assert weights and not any(".ref." in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_packing_probe_passes_real_attention_and_refuses_a_leak(offline_model, monkeypatch):
    """The SFT packing guard on SmolLM2 in bf16: sdpa and eager keep packed examples apart (transformers' mask from
    position ids); without that mask, as under an attention that ignores position ids, the trainer refuses."""
    import torch
    import transformers.masking_utils as masking
    from transformers import AutoModelForCausalLM

    from toushi.training import TrainError, check_packing_keeps_apart

    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(offline_model, dtype=torch.bfloat16, attn_implementation=impl)
        check_packing_keeps_apart(model, "sft.packing")
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TrainError, match=r"^sft.packing: packing needs .* this model's eager attention does not"):
        check_packing_keeps_apart(model, "sft.packing")


# ------------------------------------------------------------------------ tiny model: plumbing


@pytest.fixture
def fresh_run(tmp_path, tiny_model):
    return tmp_path, write_run(tmp_path / "runs" / "r")


def test_qlora_sft(fresh_run):
    root, run_dir = fresh_run
    recipe = write_recipe(
        root / "q.yaml", run_dir, "tiny-random",
        sft={"lora": {"r": 4, "alpha": 8, "qlora": True},
             "train": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "learning_rate": 1e-2,
                       "eval_fraction": 0.0}},
    )
    train_in_process("sft", recipe)
    t = manifest(run_dir, "sft")["training"]
    assert t["steps"] == 2 and math.isfinite(t["final_loss"])
    weights = adapter_weights(run_dir / "sft" / "adapter")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_trainer_script_leaves_out_what_its_stage_cannot_use(tmp_path, monkeypatch):
    """A launched trainer imports peft without bitsandbytes (about 1.2 s of each launch) unless its stage may quantize,
    TRL's GRPO and distillation trainers without vLLM (3.3 s) unless they may generate with it or judge on it, and
    without mlflow (0.4 s) unless the stage reports to it. The launched trainers of this suite, the rehearsal's too,
    train with them left out."""
    import importlib.util

    from transformers.integrations import is_mlflow_available

    from toushi.training import leave_out_unused

    # leave_out_unused sets DISABLE_MLFLOW_INTEGRATION in this process: unset here, and unset again afterwards
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "FALSE")
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION")
    assert is_mlflow_available()  # installed with the dev extra: what is left out below is there to import

    judge = {"name": "smollm2-135m-instruct", "engine": "vllm"}
    cases = [  # stage, its section, models, a CUDA device -> (bitsandbytes kept, vllm kept)
        ("sft", {"lora": {"qlora": False}}, {}, True, (False, True)),  # TRL's SFT imports no vLLM: left alone
        ("sft", {"lora": {"qlora": "auto"}}, {}, False, (False, True)),
        ("sft", {"lora": {"qlora": "auto"}}, {}, True, (True, True)),
        ("dpo", {"lora": {"qlora": True}}, {}, False, (True, True)),
        ("grpo", {}, {}, False, (False, False)),  # use_vllm unset: TRL generates with vLLM on CUDA only
        ("grpo", {}, {}, True, (False, True)),
        ("grpo", {"use_vllm": True}, {}, False, (False, True)),
        ("grpo", {"reward_weights": {"format": 1.0, "judge": 1.0}}, {"judge": judge}, False, (False, True)),
        ("grpo", {"reward_weights": {"format": 1.0, "judge": 1.0}}, {"judge": {**judge, "engine": "hf"}}, False,
         (False, False)),
        ("grpo", {"reward_weights": {"format": 1.0}}, {"judge": judge}, False, (False, False)),  # no judge reward
        ("distill", {"use_vllm": False}, {}, True, (False, False)),
        ("selftrain", {}, {"judge": judge}, False, (False, True)),  # its judge may run on vLLM in the trainer
    ]
    for stage, section, models, gpu, kept in cases:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({
            "run": {"name": "r", "dir": str(tmp_path / "runs"), "stages": [stage]},
            "models": {"student": {"name": "tiny-random"}, **models}, stage: section}))
        for package in ("bitsandbytes", "vllm"):
            monkeypatch.delitem(sys.modules, package, raising=False)
        monkeypatch.setattr("torch.cuda.is_available", lambda gpu=gpu: gpu)  # this machine has no CUDA device
        leave_out_unused(stage, ["--recipe", str(recipe)])
        found = tuple(importlib.util.find_spec(p) is not None for p in ("bitsandbytes", "vllm"))
        assert found == kept, (stage, section, models, gpu)
    with pytest.raises(ImportError):  # the last case left bitsandbytes out
        import bitsandbytes  # noqa: F401
    for report_to, kept in (("mlflow", True), ("tensorboard", False)):  # TRL's profiling imports mlflow if it may
        monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
        recipe.write_text(yaml.safe_dump({
            "run": {"name": "r", "dir": str(tmp_path / "runs"), "stages": ["grpo"]},
            "models": {"student": {"name": "tiny-random"}}, "train": {"report_to": report_to}}))
        leave_out_unused("grpo", ["--recipe", str(recipe)])
        assert is_mlflow_available() == kept, report_to


def test_toushi_processes_put_large_cpu_tensors_on_huge_pages():
    """A process that imports toushi before torch (the CLI, the trainers, the engines they start) allocates its
    large CPU tensors on transparent huge pages (toushi/__init__.py); THP_MEM_ALLOC_ENABLE=0 still turns it off."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no process transparent huge pages")
    code = ("import os, toushi, torch; x = torch.ones(64 * 2**20); print(os.environ.get('THP_MEM_ALLOC_ENABLE'), "
            "sum(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') "
            "if line.startswith('AnonHugePages')))")  # the setting torch read, and kB on huge pages (256 MB tensor)

    def run(**env) -> tuple[str, int]:
        base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        setting, kb = done.stdout.split()[-2:]
        return setting, int(kb)

    on, off = run(), run(THP_MEM_ALLOC_ENABLE="0")
    assert on[0] == "1" and off[0] == "0"  # set before torch's import; a value already set stands
    assert on[1] >= 200 * 1024
    # under "always" every large allocation gets huge pages, asked or not: only "madvise" shows the setting's effect
    if "[madvise]" in thp.read_text():
        assert off[1] < 200 * 1024


def test_toushi_processes_keep_freed_cpu_memory_for_the_next_tensors(monkeypatch):
    """On a CPU-only machine a process that imports toushi reuses the memory of the large tensors it freed: no new
    page faults (each one a page the kernel zeroes) for the next ones, the processes it starts likewise (through
    GLIBC_TUNABLES), and release_freed_memory (an engine's close) hands the memory back. A malloc tunable already
    set is left as it is, and so is a GPU machine.

    Each next tensor is smaller than the one freed before it, which always fits where that one was. Five tensors
    of one size in a row reused the first one's memory only in some processes (toushi/heap.py says why): 3,200
    faults in CI at stop 47; here, in 1 of 24 to 33 of 40 processes, by batch of runs."""
    import toushi.hardware
    from toushi.heap import MALLOC_TUNABLES, keep_freed_memory

    if toushi.hardware.cuda_possible():
        pytest.skip("a machine with a GPU driver keeps glibc's defaults (its tensors live on the card)")
    code = (
        "import os, resource, subprocess, sys, toushi, torch\n"
        "from toushi.heap import release_freed_memory\n"
        "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "rss_mb = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20\n"
        "t = torch.empty(2**27); t.fill_(1.0); del t\n"  # 512 MB: far above glibc's mmap threshold
        "f = faults()\n"
        "for n in (2**26, 2**25, 2**24):\n"  # 256, 128, 64 MB
        "    t = torch.empty(n); t.fill_(1.0); del t\n"
        "again = faults() - f; held = rss_mb()\n"
        "release_freed_memory(); back = rss_mb()\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GLIBC_TUNABLES\"))'],\n"
        "                       capture_output=True, text=True).stdout.strip()\n"
        "print(again, held, back, child)\n")

    def run(**env) -> tuple[int, int, int, str]:
        base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        again, held, back, child = done.stdout.split()[-4:]
        return int(again), int(held), int(back), child

    again, held, back, child = run()
    assert again < 100, again  # 448 MB of tensors, from memory the process kept
    assert held - back > 400, (held, back)  # the 512 MB handed back on request
    assert child == MALLOC_TUNABLES
    chosen = "glibc.malloc.mmap_threshold=131072"
    again, _, _, child = run(GLIBC_TUNABLES=chosen)
    assert again > 3 * 100, again  # glibc's way: each tensor new pages (1,760 faults here, on huge pages)
    assert child == chosen
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(toushi.hardware, "cuda_possible", lambda: True)
    assert keep_freed_memory() is False and "GLIBC_TUNABLES" not in os.environ


def test_no_chat_template_error_and_rank_warning(tmp_path, tiny_model):
    import shutil

    from toushi.training import TrainError, load_tokenizer, lora_config

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainError, match=r"'my-student' has no chat template: set sft.train.chat_template"):
        load_tokenizer(str(bare), "my-student", None, "sft.train")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert load_tokenizer(str(bare), "my-student", template, "sft.train").chat_template.startswith("{% for")
    with pytest.warns(UserWarning, match="max_lora_rank"):
        lora_config(32, 64, 0.0, "all-linear", "sft.lora")


def test_report_to_local_tracker(fresh_run, monkeypatch):
    """train.report_to: mlflow with its local file store: a 1-step SFT logs its loss into the stage's mlflow run,
    with the resolved recipe attached; after eval the summary is attached to the same run."""
    from mlflow import MlflowClient

    from toushi.tracking import log_eval_summary

    root, run_dir = fresh_run
    # the script sets these for its own process; restore them for the tests after this one
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    recipe = write_recipe(
        root / "track.yaml", run_dir, "tiny-random", train={"report_to": "mlflow"},
        sft={"lora": {"r": 4, "alpha": 8},
             "train": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "eval_fraction": 0.0}},
    )
    train_in_process("sft", recipe)
    tracking = manifest(run_dir, "sft")["tracking"]
    assert tracking["report_to"] == "mlflow" and tracking["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking["tracking_uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.run_name == "r/sft" and run.info.status == "FINISHED"
    assert "train_loss" in run.data.metrics or "loss" in run.data.metrics, run.data.metrics
    logged = (run_dir / "mlruns").rglob("recipe.yaml")
    assert any("report_to: mlflow" in p.read_text() for p in logged)

    summary = run_dir / "eval" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"systems": {"sft": {"n": 3}}}))
    assert log_eval_summary(run_dir, summary) == ["sft"]
    assert [a.path for a in client.list_artifacts(tracking["run_id"], "eval")] == ["eval/summary.json"]
