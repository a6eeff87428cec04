"""Self-training of the student on its own confident answers, round by round, over TRL's SFTTrainer.

    accelerate launch [--config_file recipes/accelerate/X.yaml] train/selftrain.py --recipe recipes/X.yaml \
        [--set selftrain.rounds=2] [--resume]

recipe -> the train prompts of runs/<run>/pairs and the SFT set (as the sft stage builds it) -> for each round not
done yet: the current student (base + the last round's adapter) samples answers to the prompts, the checks of
toushi/selftrain.py keep the finished, well-formed and confident ones (confidence: its own log-prob, or the judge's
rubric score), and TRL's SFTTrainer continues the adapter on the SFT set plus the kept answers ->
runs/<run>/selftrain/rounds/<r>/ (samples.jsonl, adapter/), rounds.jsonl, adapter/ and the stage manifest.

With --resume (what `toushi run` passes) a finished round of this setting is never redone; an interrupted one
samples again with the same seed (the judge's verdicts come back from its call cache) and its training continues
from a checkpoint of the same fingerprint, as the other trainers' do. Under several processes the main one samples
and judges while the others wait; every process trains.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from toushi.heap import imports_done  # noqa: E402
from toushi.training import leave_out_unused  # noqa: E402

if __name__ == "__main__":
    gc.disable()  # the imports' objects are not garbage: no collections while they grow (toushi/heap.py)
    leave_out_unused("selftrain")  # before peft and TRL are imported: what this run cannot use, they do not load

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from toushi.datasets import load_sft  # noqa: E402
from toushi.engines.adapters import complete_adapter  # noqa: E402
from toushi.models import resolve_model  # noqa: E402
from toushi.selftrain import (  # noqa: E402
    REJECT_REASONS,
    SelfTrainError,
    finished_rounds,
    judge_spec,
    judging,
    load_round_model,
    round_key,
    sample_answers,
    train_prompts,
    verdict,
)
from toushi.store import RecordWriter, StageStore, atomic_write_text, read_jsonl, stable_id, staged_dir  # noqa: E402
from toushi.tracking import end as end_tracking  # noqa: E402
from toushi.tracking import start as start_tracking  # noqa: E402
from toushi.training import (  # noqa: E402
    checkpoint_fingerprint,
    full_state_dict,
    is_main_process,
    load_and_save_recipe,
    load_tokenizer,
    parse_args,
    save_adapter,
    train_or_reuse,
    train_summary,
    trainer_kwargs,
    use_bf16,
)


def sample_round(r: int, key: str, recipe, store: StageStore, prompts: list[dict], model, tok, judge) -> list[dict]:
    """Round r's samples from ``model``, each with its confidence, verdict and (confidence: judge) score."""
    cfg = recipe.selftrain
    torch.manual_seed(int(stable_id(key, r), 16) % 2**31)  # each round samples differently, a redone one the same
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    print(f"[toushi] selftrain round {r}: sampling {cfg.samples_per_prompt} answers x {len(prompts)} prompts",
          flush=True)
    sampled = sample_answers(model, tok, convs, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature,
                             recipe.models.student.hf_batch_size, cfg.stop)
    if judge is not None:  # judge only what passes the cheap checks
        todo = [(p["post"], a) for p, answers in zip(prompts, sampled) for a in answers if not verdict(a, p["post"])]
        print(f"[toushi] selftrain round {r}: judging {len(todo)} answers", flush=True)
        with judging(judge, StageStore(store.dir, "judge_cache")) as scorer:  # freed before the round trains
            scores = scorer.raw_scores([post for post, _ in todo], [a["text"] for _, a in todo])
        for (_, a), score in zip(todo, scores):
            a["judge_score"] = score
    tau, judge_tau = (None, cfg.judge_tau) if judge is not None else (cfg.tau, None)
    samples = []
    for p, answers in zip(prompts, sampled):
        for k, a in enumerate(answers):
            reasons = verdict(a, p["post"], tau=tau, judge_tau=judge_tau)
            samples.append({"id": stable_id(key, r, p["id"], k), "prompt_id": p["id"], "k": k, **a,
                            "kept": not reasons, "rejected": reasons})
    return samples


def run_round(r: int, key: str, recipe, store: StageStore, prompts: list[dict], sft_examples: list[dict],
              adapter_in: Path | None, judge, resume: bool, tracking: dict | None) -> dict:
    """Round r: sample from base + adapter_in, keep what passes, continue training on the SFT set + kept."""
    cfg, student = recipe.selftrain, recipe.models.student
    t0 = time.time()
    state = PartialState()
    round_dir = store.dir / "rounds" / str(r)
    if state.is_main_process:  # a round not in the log is redone; only its checkpoints, fingerprinted, may stand
        shutil.rmtree(round_dir / "adapter", ignore_errors=True)
        (round_dir / "samples.jsonl").unlink(missing_ok=True)
        round_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(student.name)
    tok = load_tokenizer(model_path, student.name, cfg.train.chat_template, "selftrain.train")
    bf16 = use_bf16(cfg.train.bf16)
    model = load_round_model(recipe, model_path, adapter_in, bf16)

    # ---- sample and filter: the main process; the others read what it wrote
    if state.is_main_process:
        samples = sample_round(r, key, recipe, store, prompts, model, tok, judge)
        atomic_write_text(round_dir / "samples.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    state.wait_for_everyone()
    samples = list(read_jsonl(round_dir / "samples.jsonl"))
    post_of = {p["id"]: p["prompt"] for p in prompts}
    kept = [{"id": s["id"], "source": "selftrain", "messages": [
        {"role": "user", "content": post_of[s["prompt_id"]]}, {"role": "assistant", "content": s["text"]}]}
        for s in samples if s["kept"]]

    # ---- train (only when the round found something to learn from)
    training, adapter_out = None, adapter_in
    if kept:
        examples = sft_examples + kept
        print(f"[toushi] selftrain round {r}: kept {len(kept)}/{len(samples)}; training on {len(examples)} examples",
              flush=True)
        tok.padding_side = "right"
        args = SFTConfig(
            **trainer_kwargs(cfg.train, round_dir / "checkpoints", recipe.run.seed, bf16, has_eval=False,
                             tracking=tracking),
            packing=False, completion_only_loss=True, dataset_num_proc=None,
        )
        data = Dataset.from_list([{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples])
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        fingerprint = checkpoint_fingerprint(model_path, cfg.model_dump(mode="json"), recipe.run.seed, examples,
                                             start_adapter=adapter_in, extra={"round": r,
                                                                              "chat_template": tok.chat_template})
        result, run_info = train_or_reuse(trainer, round_dir / "checkpoints", resume, fingerprint,
                                          state.is_main_process)
        state_dict = full_state_dict(trainer)  # every process: ZeRO-3 / FSDP gather the sharded weights here
        adapter_out = round_dir / "adapter"
        if state.is_main_process:
            save_adapter(trainer.accelerator.unwrap_model(trainer.model), tok, adapter_out, state_dict)
        training = {**train_summary(trainer, result, None), **run_info}  # reused: no train_loss, the losses logged
    else:
        print(f"[toushi] selftrain round {r}: no answer passed; adapter unchanged", flush=True)
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args("selftrain", argv)
    main_proc = is_main_process()

    # ---- recipe
    recipe = load_and_save_recipe(args, "selftrain", main_proc)
    cfg, s = recipe.selftrain, recipe.sft
    store = StageStore(recipe.run_dir, "selftrain")

    # ---- data: the train prompts, the SFT set, the adapter round 1 starts from
    pairs = StageStore(recipe.run_dir, "pairs")
    prompts = train_prompts(pairs.records(), cfg.max_prompts)
    if not prompts:
        raise SelfTrainError(f"{pairs.records_path}: no train prompts (split == 'train')")
    sft_examples, sft_counts = load_sft(recipe.run_dir, target=s.target, context_distillation=s.context_distillation,
                                        keep_think=s.keep_think, drop_markdown=s.drop_markdown)
    sft_adapter = recipe.run_dir / "sft" / "adapter"
    start = sft_adapter if complete_adapter(sft_adapter) else None
    judge = judge_spec(recipe) if cfg.confidence == "judge" else None
    key = round_key(recipe, resolve_model(recipe.models.student.name), prompts, sft_examples, start, judge)
    print(f"[toushi] selftrain data: {len(prompts)} prompts, {len(sft_examples)} SFT examples", flush=True)

    # ---- the rounds of this setting already done; the log keeps just them
    rounds_path = store.dir / "rounds.jsonl"
    state = PartialState()
    if state.is_main_process:  # the main process alone repairs and rewrites the log; the others read it after
        done = finished_rounds(rounds_path, key, cfg.rounds) if args.resume else []
        atomic_write_text(rounds_path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in done))
        if done:
            print(f"[toushi] selftrain: rounds 1..{len(done)} already done, resuming at round {len(done) + 1}",
                  flush=True)
    state.wait_for_everyone()
    done = list(read_jsonl(rounds_path))
    # a round that kept nothing passes its input on, so the last round's output is the current student
    adapter = (Path(done[-1]["adapter_out"]) if done[-1]["adapter_out"] else None) if done else start

    # ---- train, round by round
    tracking = start_tracking(recipe, "selftrain", store.dir, main_proc) if len(done) < cfg.rounds else None
    for r in range(len(done) + 1, cfg.rounds + 1):
        rec = run_round(r, key, recipe, store, prompts, sft_examples, adapter, judge, args.resume, tracking)
        if state.is_main_process:
            with RecordWriter(rounds_path, batch_size=1) as w:
                w.write(rec)
        done.append(rec)
        adapter = Path(rec["adapter_out"]) if rec["adapter_out"] else None

    # ---- save: the stage's adapter exists only when a round trained (an untouched SFT adapter would show up in
    # eval as a "selftrain" system identical to sft)
    if not state.is_main_process:
        return
    trained = [rec for rec in done if rec["trained"]]
    final = store.dir / "adapter"
    if trained:  # copied beside, then renamed into place: a kill mid-copy leaves no half adapter
        with staged_dir(final) as tmp:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
    counts = {
        "prompts": len(prompts), "sft_examples": len(sft_examples), "rounds": len(done),
        "kept": sum(rec["kept"] for rec in done), "rejected": sum(rec["rejected"] for rec in done),
        "trained_rounds": len(trained),
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
    }
    store.write_manifest(
        data={**sft_counts, **counts}, training=trained[-1]["training"] if trained else {},
        rounds=[{k: v for k, v in rec.items() if k != "training"} for rec in done],
        start_adapter=str(start) if start else None, adapter=str(final) if trained else None, tracking=tracking,
        base_model=resolve_model(recipe.models.student.name),
    )
    print(f"[toushi] selftrain done: {counts}", flush=True)
    if tracking:
        end_tracking(tracking)


if __name__ == "__main__":
    imports_done()  # what the imports built frozen, the collector back on
    main()
