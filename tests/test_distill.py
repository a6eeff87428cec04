"""On-policy distillation (train/distill.py over TRL's DistillationTrainer), real training steps on CPU.

- SmolLM2, `teacher: guided`, through `toushi run` (the runner launches the script with accelerate): the
  student's reverse KL to the guided teacher and its NLL of the teacher's own held-out guided answers fall below
  the base student's.
- tiny random models, `teacher: strong`: a reasoning teacher whose embedding has padding rows and whose tokenizer
  reads the student's end token as another token: both are handled and said so in the manifest.
- the pre-flight check refuses a teacher with another vocabulary or too few rows, naming both sizes, before
  any weights are loaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from test_datasets import GUIDANCE, write_run
from test_train import train_script

from toushi.store import StageStore

SMALL_TRAIN = {"per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
               "lr_scheduler_type": "constant"}


def write_guidance(run_dir: Path) -> Path:
    (run_dir / "guidance").mkdir(parents=True, exist_ok=True)
    (run_dir / "guidance" / "guidance.json").write_text(json.dumps({"system_prompt": GUIDANCE}))
    return run_dir


# ------------------------------------------------------------------------ SmolLM2, guided teacher


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory, offline_model):
    from toushi.recipe import load_recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    root = tmp_path_factory.mktemp("distill")
    run_dir = write_guidance(write_run(root / "runs" / "dg"))
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "run": {"name": "dg", "dir": str(run_dir.parent), "stages": ["distill"]},
        "models": {"student": {"name": "smollm2-135m-instruct", "dtype": "float32"}},
        "guided": {"retrieved_examples": 1},
        "distill": {"teacher": "guided", "max_completion_length": 24,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "train": {**SMALL_TRAIN, "max_steps": 6, "learning_rate": 1e-3}},
    }))
    recipe = load_recipe(recipe_path)
    assert run_stages(recipe, STAGES) == {"distill": "ran"}
    return run_dir, recipe, offline_model


def test_guided_distill_manifest_kl_curve_and_teacher_calls(guided_run):
    run_dir, _, _ = guided_run
    m = json.loads((run_dir / "distill" / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["data"]["train_examples"] == 13 and m["data"]["heldout_excluded"] == 3
    assert m["data"]["teacher"] == "guided"
    t = m["training"]
    assert t["steps"] == 6 and t["divergence"] == "reverse_kl"
    assert len(t["kl"]) == 6 and all(math.isfinite(v) and v >= 0 for v in t["kl"])
    # on-policy samples differ every step, so compare the ends of the curve, not single steps
    assert sum(t["kl"][-2:]) < sum(t["kl"][:2]), t["kl"]
    assert t["teacher_calls"] == 6 and t["teacher_tokens_scored"] > 0
    assert t["tokens_per_s"] > 0
    assert m["preflight"]["notes"] == [] and m["preflight"]["unscored_ids"] == []  # same model: nothing to fix
    assert any(v.abs().sum() > 0 for k, v in _weights(run_dir / "distill" / "adapter").items() if "lora_B" in k)


def test_guided_distill_moves_student_toward_guided_teacher_on_heldout(guided_run):
    """Held-out prompts (never trained on): the teacher (base + guidance system prompt) writes its greedy
    answers; the distilled student, reading the bare prompt, is closer to the teacher (reverse KL) and gives
    those guided answers a lower NLL than the base student does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.engines import make_engine
    from toushi.guided import guided_systems
    from toushi.pairs import conversation
    from toushi.recipe import ModelSpec, Sampling
    from toushi.teacher import answer_divergence, teacher_prompt_ids

    run_dir, recipe, base_path = guided_run
    pairs = StageStore(run_dir, "pairs").records()
    held = [p for p in pairs if p["split"] == "heldout"]
    systems = guided_systems(held, pairs, GUIDANCE, recipe.guided.retrieved_examples, "en")
    convs = [conversation(p["prompt"], s) for p, (_, s) in zip(held, systems)]
    # greedy answers through toushi's hf engine; at most 40 tokens each, a fixed text to measure over, not a target
    with make_engine(ModelSpec(name=str(base_path), engine="hf", dtype="float32")) as engine:
        answers = [c[0].text.strip() for c in engine.generate(convs, Sampling(temperature=0.0, max_tokens=40))]
    assert all(answers)
    tok = AutoTokenizer.from_pretrained(base_path)
    teacher = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    teacher_prompts = [teacher_prompt_ids(tok, c) for c in convs]

    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                        str(run_dir / "distill" / "adapter")).eval()

    memo: dict = {}  # the teacher's logits over each answer, read once for both students

    def measure(model):
        rows = [answer_divergence(model, tok, [{"role": "user", "content": p["prompt"]}], teacher, ids, a, memo)
                for p, ids, a in zip(held, teacher_prompts, answers)]
        n = sum(r["tokens"] for r in rows)
        return (sum(r["kl"] * r["tokens"] for r in rows) / n, sum(r["nll"] * r["tokens"] for r in rows) / n)

    trained_kl, trained_nll = measure(student)
    with student.disable_adapter():
        base_kl, base_nll = measure(student)
    assert trained_kl < base_kl, (trained_kl, base_kl)
    assert trained_nll < base_nll, (trained_nll, base_nll)


def _weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


# ------------------------------------------------------------------------ tiny models, strong teacher


def padded_teacher(tiny: Path, out: Path, extra_rows: int = 64, end_token: str | None = None) -> Path:
    """A copy of the tiny model whose embedding has ``extra_rows`` padding rows; with ``end_token`` its
    tokenizer reads the student's end-of-turn id as that token instead (as R1-Distill reads Qwen's <|im_end|>)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + extra_rows)
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    if end_token:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            text = (out / name).read_text()
            (out / name).write_text(text.replace("<|im_end|>", end_token))
    return out


def test_strong_teacher_with_padding_rows_and_foreign_end_token(tmp_path, tiny_model):
    run_dir = write_run(tmp_path / "runs" / "ds")
    teacher = padded_teacher(tiny_model, tmp_path / "teacher", end_token="<|assistant_end|>")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "ds", "dir": str(run_dir.parent), "stages": ["distill"]},
        "models": {"student": {"name": "tiny-random", "dtype": "float32"},
                   "strong": {"name": str(teacher), "dtype": "float32", "reasoning": True}},
        "distill": {"teacher": "strong", "strong_reasoning": "pairs", "beta": 0.5, "max_completion_length": 12,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                    "train": {**SMALL_TRAIN, "max_steps": 2, "learning_rate": 1e-3}},
    }))
    train_script("distill").main(["--recipe", str(recipe)])
    m = json.loads((run_dir / "distill" / "manifest.json").read_text())
    pre = m["preflight"]
    assert pre["student_rows"] == 49152 and pre["teacher_rows"] == 49152 + 64 and pre["rows"] == 49152
    assert any("only by padding" in n and "sliced to the first 49152 rows" in n for n in pre["notes"])
    assert pre["unscored_ids"] == [2]  # <|im_end|>: the teacher's tokenizer calls it <|assistant_end|>
    assert any("left out of the loss" in n for n in pre["notes"])
    t = m["training"]
    assert t["steps"] == 2 and t["divergence"] == "jsd_beta_0.5" and t["teacher_calls"] == 2
    assert all(math.isfinite(v) for v in t["kl"])
    assert (run_dir / "distill" / "adapter" / "adapter_model.safetensors").exists()


def test_teacher_prompt_closes_think_block_with_pairs_reasoning(tiny_model):
    from transformers import AutoTokenizer

    from toushi.teacher import teacher_prompt_ids, think_prefill

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = [{"role": "user", "content": "I failed my exam."}]
    plain = tok.decode(teacher_prompt_ids(tok, conv))
    with_thought = tok.decode(teacher_prompt_ids(tok, conv, think=True, reasoning="Validate first."))
    assert with_thought == plain + "<think>\nValidate first.\n</think>\n\n"
    # R1-Distill's newer templates open <think> themselves: only the rest of the block is added
    assert think_prefill("<｜Assistant｜><think>\n", None) == "\n</think>\n\n"


# ------------------------------------------------------------------------ pre-flight refusals


def other_vocab_tokenizer(out: Path):
    """A real BPE tokenizer trained here on a few sentences: a vocabulary unrelated to SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    texts = ["I failed my driving test again today.", "My dog died this morning.", "I feel stuck."] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>")
    tok.save_pretrained(out)
    return tok


def test_preflight_refuses_other_vocabulary_and_too_few_rows(tmp_path, offline_model, tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    from toushi.preflight import IncompatibleTeacher, check_teacher

    cfg, tok = AutoConfig.from_pretrained(offline_model), AutoTokenizer.from_pretrained(offline_model)
    same = check_teacher(cfg, tok, AutoConfig.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model),
                         [tok.eos_token_id])
    assert same.rows == 49152 and same.notes == [] and same.unscored_ids == []

    other = other_vocab_tokenizer(tmp_path / "other")
    other_cfg = AutoConfig.from_pretrained(tiny_model)
    other_cfg.vocab_size = len(other)
    with pytest.raises(IncompatibleTeacher, match=r"different vocabularies.*student tokenizer 49152 tokens / 49152 "
                                                  rf"embedding rows, teacher {len(other)} tokens / {len(other)} rows"):
        check_teacher(cfg, tok, other_cfg, other, [tok.eos_token_id])

    small_cfg = AutoConfig.from_pretrained(tiny_model)
    small_cfg.vocab_size = 32000
    with pytest.raises(IncompatibleTeacher, match=r"student 49152 rows, teacher 32000 rows.*ids up to 49151"):
        check_teacher(cfg, tok, small_cfg, tok, [tok.eos_token_id])


def test_distill_refuses_mismatched_teacher_before_loading_weights(tmp_path, tiny_model):
    """The whole script stops at the check: the teacher dir has a config and a tokenizer but no weights,
    so reaching the model loading would fail differently."""
    from toushi.preflight import IncompatibleTeacher

    run_dir = write_run(tmp_path / "runs" / "dx")
    teacher = tmp_path / "other-teacher"
    other = other_vocab_tokenizer(teacher)
    cfg = json.loads((tiny_model / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, "vocab_size": len(other)}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "dx", "dir": str(run_dir.parent), "stages": ["distill"]},
        "models": {"student": {"name": "tiny-random"}, "strong": {"name": str(teacher)}},
        "distill": {"teacher": "strong", "train": {"max_steps": 1}},
    }))
    with pytest.raises(IncompatibleTeacher, match=rf"teacher {len(other)} tokens / {len(other)} rows"):
        train_script("distill").main(["--recipe", str(recipe)])
    assert not (run_dir / "distill" / "checkpoints").exists()


def tiny_trainer(tmp_path, tiny_model, unscored_ids=None, **config):
    """The wrapped trainer on the tiny model, with a perturbed copy as teacher (another model than the student)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig

    from toushi.teacher import TeacherPromptDistillationTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, max_steps=1,
                              **config)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "teacher_prompt_ids": [1, 2]}])
    trainer = TeacherPromptDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                               processing_class=tok, unscored_ids=unscored_ids)
    return trainer, tok


def test_teacher_scores_the_student_completion_after_its_own_prompt(tmp_path, tiny_model):
    """The override's alignment: the teacher's hidden states for the completion tokens equal those of a plain
    forward of (teacher prompt + completion), row by row, whatever the left padding of either prompt."""
    import torch

    trainer, tok = tiny_trainer(tmp_path, tiny_model)
    teacher = trainer.teacher_model
    pad = tok.pad_token_id
    student_prompt = torch.tensor([[pad, pad, 11, 12, 13], [21, 22, 23, 24, 25]])
    teacher_prompt = torch.tensor([[31, 32, 33, 34, 35, 36, 37], [pad, pad, pad, 41, 42, 43, 44]])
    completion = torch.tensor([[101, 102, 103, 104], [201, 202, pad, pad]])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ids = torch.cat([student_prompt, completion], 1)
    mask = torch.cat([(student_prompt != pad).long(), completion_mask], 1)
    trainer._teacher_prompt = (teacher_prompt, (teacher_prompt != pad).long())
    with torch.no_grad():
        got = trainer._get_last_hidden_state(teacher, ids, mask, logits_to_keep=4)
        assert trainer.teacher_calls == 1 and trainer.teacher_tokens == 6
        rows = ((teacher_prompt[0], completion[0], 4), (teacher_prompt[1, 3:], completion[1], 2))  # unpadded
        for row, (tp, c, n) in enumerate(rows):
            plain = teacher.model(input_ids=torch.cat([tp, c[:n]]).unsqueeze(0)).last_hidden_state[0]
            want = plain[len(tp) - 1 : len(tp) - 1 + n]  # the states that predict the completion tokens
            torch.testing.assert_close(got[row, :n], want, atol=1e-4, rtol=1e-4)
        # the student's own call is left alone (its prompt, not the teacher's)
        own = trainer._get_last_hidden_state(trainer.model, ids, mask, logits_to_keep=4)
        assert trainer.teacher_calls == 1 and not torch.allclose(own[0], got[0])


def test_rollouts_carry_teacher_prompts_and_leave_unscored_end_tokens_out(tmp_path, tiny_model):
    """A real generation step: each rollout gets its own teacher prompt (left-padded), and an end token the
    teacher cannot read (here forced as the 4th and last token) is out of the loss mask and the token count."""
    end = 2  # <|im_end|>
    trainer, tok = tiny_trainer(tmp_path, tiny_model, unscored_ids=[end], max_completion_length=4,
                                generation_kwargs={"forced_eos_token_id": end, "min_new_tokens": 4})
    inputs = [{"prompt": [{"role": "user", "content": "I failed my exam."}], "teacher_prompt_ids": [5, 6, 7]},
              {"prompt": [{"role": "user", "content": "My dog died."}], "teacher_prompt_ids": [8, 9]}]
    out = trainer._generate_and_score_completions(inputs)
    assert out["teacher_prompt_ids"].tolist() == [[5, 6, 7], [tok.pad_token_id, 8, 9]]
    assert out["teacher_prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert out["completion_ids"][:, -1].tolist() == [end, end]
    assert out["completion_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert int(out["num_items_in_batch"]) == 6


@pytest.mark.gpu
def test_guided_distill_with_vllm_rollouts_on_gpu(tmp_path, offline_model):
    """The GPU path: the student's rollouts come from TRL's colocated vLLM (distill.use_vllm), the teacher
    scores in-process on the GPU."""
    run_dir = write_guidance(write_run(tmp_path / "runs" / "dv"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "dv", "dir": str(run_dir.parent), "stages": ["distill"]},
        "models": {"student": {"name": "smollm2-135m-instruct"}},
        "distill": {"teacher": "guided", "use_vllm": True, "max_completion_length": 32,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "train": {**SMALL_TRAIN, "max_steps": 4, "learning_rate": 1e-3}},
    }))
    train_script("distill").main(["--recipe", str(recipe)])
    m = json.loads((run_dir / "distill" / "manifest.json").read_text())
    assert m["use_vllm"] is True and m["training"]["steps"] == 4 and m["training"]["teacher_calls"] == 4
    assert all(math.isfinite(v) for v in m["training"]["kl"])
