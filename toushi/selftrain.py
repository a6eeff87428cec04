"""The ``selftrain`` stage: the student answers its own training prompts; the answers it is sure of and
that pass the format check join the SFT set for another short round of training.

Each round r = 1..rounds:

1. sample ``samples_per_prompt`` answers per train prompt (pairs records, split == train) from the
   current student: the base plus the previous round's adapter; round 1 starts from the SFT adapter when
   the run has one, else from a fresh LoRA (which is the base model until trained);
2. confidence (``confidence: logprob``, the default) = mean token log-prob of each answer under the
   student's own untempered distribution (``compute_transition_scores`` on the raw logits: temperature
   shapes what is sampled, not how sure the model is of it), the end-of-turn token included, since choosing
   to stop is part of the answer; or (``confidence: judge``) the judge's 1-10 rubric score
   (``rewards.JudgeScorer``, cached in ``judge_cache/`` so a redone round asks again for nothing), asked
   only for answers that passed every other check, on the run's engine pool, which frees the judge before the
   round trains;
3. keep an answer when its format reward is 1 (plain text, the post's language, no ``<think>``), it ended
   before ``max_new_tokens`` (at the end-of-turn token, or at a ``stop`` string: cut before it; a cut-off
   answer is never kept) and its confidence is above ``tau`` (log-prob) or ``judge_tau`` (judge score mapped
   to [-1, 1]); an unparseable verdict rejects (``judge_invalid``);
4. continue training the current adapter with TRL's SFTTrainer, in this process, on the SFT set
   (``toushi.datasets.load_sft``, as the sft stage builds it) plus this round's kept answers. A round that
   keeps nothing does not train: the adapter carries over unchanged.

Outputs in ``runs/<run>/selftrain/``: ``rounds.jsonl`` (one line per finished round: counts, confidences,
train loss), ``rounds/<r>/samples.jsonl`` (every sample with its confidence and verdict),
``rounds/<r>/adapter`` and ``adapter/`` (the last adapter, what eval loads; absent when no round trained
and the run has no SFT adapter). A finished round is never redone; an interrupted one is redone whole.
Rounds belong to one setting (this section but ``rounds``, the sft section, the student, the seed, the
SFT adapter's weights, the prompts): another setting starts again from round 1, while raising ``rounds``
only adds rounds.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from toushi.datasets import load_sft
from toushi.engines import cache_model
from toushi.engines.adapters import adapter_fingerprint, complete_adapter
from toushi.errors import ToushiError
from toushi.models import resolve_model
from toushi.recipe import Recipe, Sampling
from toushi.rewards import JudgeScorer, format_reward, unit_score
from toushi.runner import StageContext
from toushi.store import (
    RecordWriter,
    StageStore,
    atomic_write_text,
    read_jsonl,
    repair_jsonl,
    stable_id,
    staged_dir,
)
from toushi.tracking import end as end_tracking
from toushi.tracking import start as start_tracking
from toushi.training import (
    load_student,
    load_tokenizer,
    lora_config,
    save_adapter,
    train_summary,
    trainer_kwargs,
    use_bf16,
)


class SelfTrainError(ToushiError, RuntimeError):
    """Self-training cannot run; the message names the recipe key or stage output that is missing."""


# --------------------------------------------------------------------------------------- sampling


def answer_end(tok, ids: list[int], eos: set[int], stop: list[str], lead: str) -> tuple[str, int, bool]:
    """Where one sampled row's answer ends: (its text, its tokens, the one that ended it included, whether
    it finished). An end-of-turn token ends it; so does a stop string, the text cut before it; an answer that
    ran to the token budget is not finished. ``lead`` is the end of the prompt: generate() also stops on a stop
    string that began there (a first token "\n..." after the template's "assistant\n"), and such an answer was
    cut, not finished."""
    end = next((j for j, t in enumerate(ids) if t in eos), None)
    body = ids if end is None else ids[:end]
    text = lead + tok.decode(body, skip_special_tokens=True)
    # the first stop string that ends inside the answer (one wholly inside the prompt did not stop anything)
    hits = [(text.find(s, max(0, len(lead) - len(s) + 1)), s) for s in stop]
    at, s = min(((i, s) for i, s in hits if i >= 0), default=(-1, ""))
    if at < 0:
        return text[len(lead) :].strip(), len(ids) if end is None else end + 1, end is not None
    if at < len(lead):
        return text[len(lead) :].strip(), len(body), False  # tokens after the cut are padding
    # the fewest tokens whose text holds the stop string: the one that completed it is the answer's last
    lo, hi = 1, len(body)
    while lo < hi:
        mid = (lo + hi) // 2
        if s in tok.decode(body[:mid], skip_special_tokens=True):  # this stop lies wholly in the answer
            hi = mid
        else:
            lo = mid + 1
    return text[len(lead) : at].strip(), lo, True


def sample_answers(model, tok, convs: list[list[dict]], n: int, max_new_tokens: int, temperature: float,
                   batch_size: int, stop: list[str]) -> list[list[dict]]:
    """n sampled answers per conversation: [{"text", "confidence", "finished", "tokens"}] each. An answer
    ends at the end-of-turn token or at a stop string (cut before it); one that reached max_new_tokens first is
    not finished."""
    import torch

    eos = {tok.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    eos.discard(None)
    tok.padding_side = "left"  # prompts of different lengths end where generation starts
    longest = max((len(s) for s in stop), default=1)
    # built once, not per batch: generate(stop_strings=...) rebuilds this from the whole vocabulary on each call
    stopping = {}
    if stop:
        from transformers import StopStringCriteria

        stopping = {"stopping_criteria": [StopStringCriteria(tokenizer=tok, stop_strings=stop)]}
    out: list[list[dict]] = []
    model.eval()
    for start in range(0, len(convs), batch_size):
        batch = convs[start : start + batch_size]
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **enc, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                num_return_sequences=n, output_logits=True, return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id, **stopping,
            )
            # raw logits, renormalised: log p(token) under the untempered model
            logp = model.compute_transition_scores(gen.sequences, gen.logits, normalize_logits=True)
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        for i, prompt in enumerate(texts):
            lead = prompt[-longest:]
            answers = []
            for row in range(i * n, (i + 1) * n):  # num_return_sequences keeps each prompt's samples together
                ids = new[row].tolist()
                text, scored, finished = answer_end(tok, ids, eos, stop, lead)
                answers.append({  # tokens after the end are padding: not scored
                    "text": text,
                    "confidence": round(float(logp[row, :scored].mean()), 4),
                    "finished": finished,
                    "tokens": scored,
                })
            out.append(answers)
    return out


REJECT_REASONS = ("format", "truncated", "confidence", "judge", "judge_invalid")


def verdict(answer: dict, post: str, tau: float | None = None,
            judge_tau: float | None = None) -> list[str]:
    """Why an answer is rejected (empty list: kept). ``tau`` checks the log-prob confidence; ``judge_tau``
    checks ``answer["judge_score"]`` (1-10 or None) when the answer has one; None skips either check. An answer
    cut off at the token budget is always rejected: it is never a training target."""
    reasons = []
    if format_reward(answer["text"], post) != 1.0:
        reasons.append("format")
    if not answer["finished"]:
        reasons.append("truncated")
    if tau is not None and not answer["confidence"] > tau:
        reasons.append("confidence")
    if judge_tau is not None and "judge_score" in answer:
        score = answer["judge_score"]
        if score is None:
            reasons.append("judge_invalid")
        elif not unit_score(score) > judge_tau:
            reasons.append("judge")
    return reasons


def judge_spec(recipe: Recipe):
    """The judge of ``confidence: judge``: models.judge, else models.strong."""
    spec = recipe.models.judge or recipe.models.strong
    if spec is None:
        raise SelfTrainError("selftrain.confidence: 'judge' needs models.judge (or models.strong) in the recipe")
    return spec


@contextmanager
def judging(ctx: StageContext, spec):
    """The rubric scorer on the run's engine for ``spec`` (verdicts cached in judge_cache/), for one round's
    judging. On leaving, the engine is freed: training follows in this process and needs the memory."""
    engine = ctx.engine(spec)
    try:
        yield JudgeScorer(engine, Sampling(temperature=0.0, max_tokens=16), StageStore(ctx.store.dir, "judge_cache"),
                          cache_model(spec))
    finally:
        engine.close()  # an engine of its own (no run pool) is freed here; a pool's view frees nothing...
        ctx.free_engines()  # ...so the pool lets go of it


# --------------------------------------------------------------------------------------- one round


def train_prompts(pairs: list[dict], max_prompts: int | None) -> list[dict]:
    """Train-split pairs records in a stable order (by id), capped at max_prompts."""
    train = sorted((r for r in pairs if r.get("split") == "train"), key=lambda r: r["id"])
    return train[:max_prompts] if max_prompts else train


def load_round_model(recipe: Recipe, model_path: str, adapter_in: Path | None, bf16: bool):
    """The current student, trainable: base + adapter_in, or base + a fresh LoRA."""
    import torch
    from peft import PeftModel, get_peft_model

    cfg, student = recipe.selftrain, recipe.models.student
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    if torch.cuda.is_available() and not cfg.lora.qlora:
        model = model.to("cuda")  # QLoRA is placed on load; a plain model would sample on the CPU
    if adapter_in is not None:
        return PeftModel.from_pretrained(model, str(adapter_in), is_trainable=True)
    lora = cfg.lora
    return get_peft_model(model, lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules, "selftrain.lora"))


def train_round(model, tok, examples: list[dict], recipe: Recipe, out_dir: Path, bf16: bool,
                tracking: dict | None = None) -> dict:
    """Continue training the round's adapter on examples; save it to out_dir/adapter; return the summary."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok.padding_side = "right"
    data = Dataset.from_list([{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples])
    args = SFTConfig(
        **trainer_kwargs(recipe.selftrain.train, out_dir / "checkpoints", recipe.run.seed, bf16, has_eval=False,
                         tracking=tracking),
        packing=False, completion_only_loss=True, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    result = trainer.train()
    save_adapter(trainer.model, tok, out_dir / "adapter")
    return train_summary(trainer, result, None)


def stable_id_int(*parts) -> int:
    """A seed from stable inputs: each round samples differently, the same round the same way."""
    return int(stable_id(*parts), 16) % 2**31


def run_round(r: int, key: str, recipe: Recipe, store: StageStore, prompts: list[dict], sft_examples: list[dict],
              adapter_in: Path | None, console, judge=None, tracking: dict | None = None) -> dict:
    """Round r: sample from base + adapter_in, filter (asking the scorer of the ``judge()`` context when
    given), train on the SFT set + kept; the round's record."""
    import torch

    cfg = recipe.selftrain
    t0 = time.time()
    round_dir = store.dir / "rounds" / str(r)
    shutil.rmtree(round_dir, ignore_errors=True)  # an interrupted round is redone whole
    round_dir.mkdir(parents=True)
    model_path = resolve_model(recipe.models.student.name)
    tok = load_tokenizer(model_path, recipe.models.student.name, cfg.train.chat_template, "selftrain.train")
    bf16 = use_bf16(cfg.train.bf16)
    model = load_round_model(recipe, model_path, adapter_in, bf16)

    # ---- sample and filter
    torch.manual_seed(stable_id_int(key, r))
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    console.print(f"selftrain round {r}: sampling {cfg.samples_per_prompt} answers x {len(prompts)} prompts")
    sampled = sample_answers(model, tok, convs, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature,
                             recipe.models.student.hf_batch_size, cfg.stop)
    if judge is not None:  # judge only what passes the cheap checks
        todo = [(p["post"], a) for p, answers in zip(prompts, sampled) for a in answers
                if not verdict(a, p["post"])]
        console.print(f"selftrain round {r}: judging {len(todo)} answers")
        with judge() as scorer:
            scores = scorer.raw_scores([post for post, _ in todo], [a["text"] for _, a in todo])
        for (_, a), score in zip(todo, scores):
            a["judge_score"] = score
    tau, judge_tau = (None, cfg.judge_tau) if judge is not None else (cfg.tau, None)
    samples, kept = [], []
    for p, answers in zip(prompts, sampled):
        for k, a in enumerate(answers):
            reasons = verdict(a, p["post"], tau=tau, judge_tau=judge_tau)
            sid = stable_id(key, r, p["id"], k)
            samples.append({"id": sid, "prompt_id": p["id"], "k": k, **a, "kept": not reasons, "rejected": reasons})
            if not reasons:
                kept.append({"id": sid, "source": "selftrain", "messages": [
                    {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a["text"]}]})
    atomic_write_text(round_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    # ---- retrain (only when the round found something to learn from)
    training, adapter_out = None, adapter_in
    if kept:
        examples = sft_examples + kept
        console.print(f"selftrain round {r}: kept {len(kept)}/{len(samples)}; training on {len(examples)} examples")
        training = train_round(model, tok, examples, recipe, round_dir, bf16, tracking)
        adapter_out = round_dir / "adapter"
    else:
        console.print(f"[yellow]selftrain round {r}: no answer passed (tau={cfg.tau}); adapter unchanged[/yellow]")
    del model

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "id": stable_id(key, r), "key": key, "round": r,
        "adapter_in": str(adapter_in) if adapter_in else None,
        "adapter_out": str(adapter_out) if adapter_out else None,
        "prompts": len(prompts), "samples": len(samples), "kept": len(kept), "rejected": len(samples) - len(kept),
        "rejected_by": {why: sum(why in s["rejected"] for s in samples) for why in REJECT_REASONS},
        "mean_confidence": mean([s["confidence"] for s in samples]),
        "mean_confidence_kept": mean([s["confidence"] for s in samples if s["kept"]]),
        "judged": sum("judge_score" in s for s in samples),
        "mean_judge_score": mean([s["judge_score"] for s in samples if s.get("judge_score") is not None]),
        "train_examples": len(sft_examples) + len(kept) if kept else 0,
        "trained": bool(kept),
        "train_loss": training["train_loss"] if training else None,
        "training": training,
        "wall_s": round(time.time() - t0, 2),
    }


# --------------------------------------------------------------------------------------- stage


def finished_rounds(path: Path, key: str, rounds: int) -> list[dict]:
    """Rounds 1..k already done for this setting (contiguous, adapters on disk); [] after a setting change."""
    if not path.exists():
        return []
    repair_jsonl(path)
    recs = list(read_jsonl(path))
    if any(rec["key"] != key for rec in recs):
        return []
    done = []
    for rec in sorted(recs, key=lambda x: x["round"]):
        out = rec["adapter_out"]
        if rec["round"] != len(done) + 1 or rec["round"] > rounds or (out and not Path(out).is_dir()):
            break
        done.append(rec)
    return done


def run_stage(ctx: StageContext) -> dict:
    recipe, cfg, store = ctx.recipe, ctx.recipe.selftrain, ctx.store
    ctx.free_engines()  # self-training trains in this process: free the run's engines first
    if recipe.models.student is None:
        raise SelfTrainError("models.student: selftrain needs a student model")
    prompts = train_prompts(ctx.stage("pairs").records(), cfg.max_prompts)
    if not prompts:
        raise SelfTrainError(f"{ctx.stage('pairs').records_path}: no train prompts (split == 'train')")
    s = recipe.sft
    sft_examples, sft_counts = load_sft(ctx.run_dir, target=s.target, context_distillation=s.context_distillation,
                                        keep_think=s.keep_think, drop_markdown=s.drop_markdown)
    sft_adapter = ctx.run_dir / "sft" / "adapter"
    start = sft_adapter if complete_adapter(sft_adapter) else None

    judge = judge_spec(recipe) if cfg.confidence == "judge" else None
    key = stable_id(cfg.model_dump(mode="json", exclude={"rounds"}), s.model_dump(mode="json"),
                    recipe.models.student.model_dump(mode="json"), recipe.run.seed, adapter_fingerprint(start) if start else None,
                    prompts, stable_id(sft_examples), judge.model_dump(mode="json") if judge else None)
    rounds_path = store.dir / "rounds.jsonl"
    done = finished_rounds(rounds_path, key, cfg.rounds)
    # rewrite the log with just the rounds that stand (drops another setting's or a broken tail)
    atomic_write_text(rounds_path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in done))
    if not done:
        shutil.rmtree(store.dir / "rounds", ignore_errors=True)  # another setting's rounds: none of them stands
    else:
        ctx.console.print(f"selftrain: rounds 1..{len(done)} already done, resuming at round {len(done) + 1}")
    # a round that kept nothing passes its input on, so the last round's output is the current student
    adapter = (Path(done[-1]["adapter_out"]) if done[-1]["adapter_out"] else None) if done else start

    tracking = start_tracking(recipe, "selftrain", store.dir, True) if len(done) < cfg.rounds else None
    for r in range(len(done) + 1, cfg.rounds + 1):
        # the judge is loaded only when a round is left to judge, and freed before that round trains
        rec = run_round(r, key, recipe, store, prompts, sft_examples, adapter, ctx.console,
                        (lambda: judging(ctx, judge)) if judge is not None else None, tracking)
        with RecordWriter(rounds_path, batch_size=1) as w:
            w.write(rec)
        done.append(rec)
        adapter = Path(rec["adapter_out"]) if rec["adapter_out"] else None

    if tracking:
        end_tracking(tracking)

    # The stage's adapter exists only when self-training trained something: an untouched SFT adapter
    # would show up in eval as a "selftrain" system identical to sft.
    trained = any(rec["trained"] for rec in done)
    final = store.dir / "adapter"
    if trained:  # copied beside, then renamed into place: a kill mid-copy leaves no half adapter
        with staged_dir(final) as tmp:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
    counts = {
        "prompts": len(prompts), "sft_examples": len(sft_examples), "rounds": len(done),
        "kept": sum(rec["kept"] for rec in done), "rejected": sum(rec["rejected"] for rec in done),
        "trained_rounds": sum(rec["trained"] for rec in done),
        "final_train_loss": next((rec["train_loss"] for rec in reversed(done) if rec["trained"]), None),
    }
    store.write_manifest(
        data={**sft_counts, **counts}, rounds=[{k: v for k, v in rec.items() if k != "training"} for rec in done],
        start_adapter=str(start) if start else None, adapter=str(final) if trained else None, tracking=tracking,
        base_model=resolve_model(recipe.models.student.name),
    )
    return counts
