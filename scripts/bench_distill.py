"""Benchmark on-policy distillation against SFT and GRPO on the same prompts and step budget (not a test).

    python scripts/bench_distill.py [--steps 6] [--posts 20] [--heldout 6] [--out runs/bench-distill]

CPU, the offline SmolLM2-135M-Instruct as student and (with a guidance system prompt) as teacher:
1. the shortest ``--posts`` posts of data/venting_en.jsonl, asked with the pairs stage's task prompt;
   ``--heldout`` of them held out;
2. the guided teacher (the base model with GUIDANCE below as its system prompt) answers every prompt greedily:
   the train answers are SFT's targets (context distillation: the student sees the bare prompt), the held-out
   answers the reference for NLL and KL;
3. the three training scripts, each as its own process, LoRA r8, the same steps, 4 sequences per step and the
   same learning rate: sft (teacher's answers as targets), grpo (rule rewards format + repetition + length,
   groups of 4), distill (teacher: guided, reverse KL);
4. on the held-out prompts, for the base student and each adapter: NLL of the teacher's answers and reverse KL
   to the teacher over them (bare prompt vs guided prompt), and the mean rule reward (the GRPO sum) of the
   student's own greedy answers.
Each finished method is kept (``--reuse`` resumes a cut run). Writes <out>/bench.json and prints a Markdown table for docs/benchmarks.md. Held-out numbers on a handful of
prompts are noisy; one run, as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from toushi.paths import repo_root  # noqa: E402
from toushi.store import StageStore, atomic_write_text  # noqa: E402

GUIDANCE = ("Reply as a warm friend under the post. Name the feeling you hear first, in the person's own terms. "
            "Stay with them: no lectures, no lists, no advice unless asked. Two or three short plain sentences.")
MAX_NEW = 48


def write_run(run_dir: Path, n_posts: int, n_heldout: int) -> list[dict]:
    from toushi.pairs import task_prompt

    posts = [json.loads(line) for line in (repo_root() / "data" / "venting_en.jsonl").read_text().splitlines()]
    posts = sorted(posts, key=lambda p: (len(p["text"]), p["id"]))[:n_posts]
    held = set(range(0, len(posts), max(1, len(posts) // n_heldout))[:n_heldout])  # spread over lengths
    recs = []
    for i, p in enumerate(posts):
        split = "heldout" if i in held else "train"
        recs.append({"id": p["id"], "lang": "en", "scene": p.get("scene"), "split": split, "post": p["text"],
                     "prompt": task_prompt(p["text"], "en"), "text": p["text"]})
    write_records(run_dir, "corpus", [{k: r[k] for k in ("id", "lang", "scene", "split", "text")} for r in recs])
    (run_dir / "guidance").mkdir(parents=True, exist_ok=True)
    (run_dir / "guidance" / "guidance.json").write_text(json.dumps({"system_prompt": GUIDANCE}))
    return recs


def teacher_answers(model_path: str, recs: list[dict]) -> tuple[list[str], list[list[int]]]:
    """Greedy answers of the guided teacher and its prompt ids, per record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.pairs import conversation
    from toushi.teacher import teacher_prompt_ids

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = [teacher_prompt_ids(tok, conversation(r["prompt"], GUIDANCE)) for r in recs]
    texts = []
    for start in range(0, len(ids), 8):
        chunk = ids[start : start + 8]
        batch = tok.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        texts += [tok.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    return texts, ids


def write_answers(run_dir: Path, recs: list[dict], answers: list[str]) -> None:
    """pairs records (the prompts; strong = the teacher's answer, unused by these three) and guided records."""
    def comp(text):
        return {"text": text, "reasoning": None, "finish_reason": "length", "flags": []}

    keys = ("id", "lang", "scene", "split", "post", "prompt")
    write_records(run_dir, "pairs", [{**{k: r[k] for k in keys}, "weak": [comp(a)], "strong": [comp(a)]}
                                     for r, a in zip(recs, answers)])
    write_records(run_dir, "guided", [{**{k: r[k] for k in keys}, "system": GUIDANCE, "guided": [comp(a)]}
                                      for r, a in zip(recs, answers)])


def write_records(run_dir: Path, stage: str, records: list[dict]) -> None:
    """Replace a stage's records whole (a rerun of the benchmark starts from the same files)."""
    path = StageStore(run_dir, stage).records_path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def train(method: str, recipe: Path) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    log = recipe.parent / f"{method}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(repo_root() / "train" / f"{method}.py"), "--recipe", str(recipe)],
                              env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{method} failed (exit {proc.returncode}); see {log}")
    return time.time() - t0


def heldout_scores(model_path: str, adapters: dict[str, Path], held: list[dict], answers: list[str],
                   teacher_ids: list[list[int]]) -> dict[str, dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.rewards import format_reward, length_reward, repetition_reward
    from toushi.teacher import answer_divergence

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapters[next(iter(adapters))]), adapter_name=next(iter(adapters)))
    for name, path in list(adapters.items())[1:]:
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    out, memo = {}, {}  # memo: the teacher's logits over each answer, read once for every student
    for name in ["base", *adapters]:
        if name != "base":
            model.set_adapter(name)
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            convs = [[{"role": "user", "content": r["prompt"]}] for r in held]
            rows = [answer_divergence(model, tok, c, teacher, ids, a, memo)
                    for c, ids, a in zip(convs, teacher_ids, answers)]
            batch = tok.apply_chat_template(convs, add_generation_prompt=True, return_tensors="pt", padding=True,
                                            return_dict=True)
            with torch.no_grad():
                gen = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = [tok.decode(g[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for g in gen]
        n = sum(r["tokens"] for r in rows)
        rewards = [format_reward(t, r["post"]) + repetition_reward(t) + length_reward(t, r["post"])
                   for t, r in zip(texts, held)]
        out[name] = {"nll": sum(r["nll"] * r["tokens"] for r in rows) / n,
                     "kl": sum(r["kl"] * r["tokens"] for r in rows) / n,
                     "reward": sum(rewards) / len(rewards), "answers": texts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--posts", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-distill"))
    ap.add_argument("--reuse", action="store_true",
                    help="Keep the teacher's answers and every method already trained in --out (resume a cut run).")
    args = ap.parse_args()

    from toushi.models import resolve_model

    model_path = resolve_model("smollm2-135m-instruct")
    root = args.out.resolve()
    run_dir = root / "runs" / "bench"
    recs = write_run(run_dir, args.posts, args.heldout)
    t0 = time.time()
    guided = {g["id"]: g["guided"][0]["text"] for g in StageStore(run_dir, "guided").records()}
    if args.reuse and set(guided) == {r["id"] for r in recs}:  # greedy: the same answers as last time
        from transformers import AutoTokenizer

        from toushi.pairs import conversation
        from toushi.teacher import teacher_prompt_ids

        tok = AutoTokenizer.from_pretrained(model_path)
        answers = [guided[r["id"]] for r in recs]
        teacher_ids = [teacher_prompt_ids(tok, conversation(r["prompt"], GUIDANCE)) for r in recs]
    else:
        answers, teacher_ids = teacher_answers(model_path, recs)
        write_answers(run_dir, recs, answers)
    teacher_s = time.time() - t0
    held = [(r, a, i) for r, a, i in zip(recs, answers, teacher_ids) if r["split"] == "heldout"]

    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    train_spec = {"max_steps": args.steps, "per_device_train_batch_size": 4, "learning_rate": args.lr,
                  "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 1000, "eval_fraction": 0.0,
                  "max_length": 512}
    sections = {
        "sft": {"target": "guided", "context_distillation": True, "lora": lora, "train": train_spec},
        "grpo": {"num_generations": 4, "max_completion_length": MAX_NEW, "lora": lora,
                 "train": {k: v for k, v in train_spec.items() if k != "max_length"}},
        "distill": {"teacher": "guided", "max_completion_length": MAX_NEW, "lora": lora,
                    "train": {k: v for k, v in train_spec.items() if k != "max_length"}},
    }
    results = {}
    for method, section in sections.items():
        done = root / f"{method}.result.json"
        if args.reuse and done.exists() and (run_dir / method / "adapter" / "adapter_config.json").exists():
            results[method] = json.loads(done.read_text())
            print(f"{method}: reused {results[method]}", flush=True)
            continue
        recipe = root / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump({
            "run": {"name": "bench", "dir": str(run_dir.parent), "stages": [method]},
            "models": {"student": {"name": "smollm2-135m-instruct", "dtype": "float32"}},
            "guided": {"retrieved_examples": 0}, method: section,
        }))
        wall = train(method, recipe)
        t = json.loads((run_dir / method / "manifest.json").read_text())["training"]
        results[method] = {"wall_s": round(wall, 1), "train_runtime_s": t["train_runtime_s"],
                           "tokens_seen": t["tokens_seen"], "tokens_per_s": t["tokens_per_s"],
                           "steps": t["steps"], "first_loss": t["first_loss"], "final_loss": t["final_loss"]}
        done.write_text(json.dumps(results[method]) + "\n")
        print(f"{method}: {results[method]}", flush=True)

    adapters = {m: run_dir / m / "adapter" for m in sections}
    scores = heldout_scores(model_path, adapters, [h[0] for h in held], [h[1] for h in held], [h[2] for h in held])
    report = {"steps": args.steps, "lr": args.lr, "posts": args.posts, "heldout": len(held),
              "teacher_answers_s": round(teacher_s, 1), "load_avg_1m_end": os.getloadavg()[0],
              "train": results, "heldout_scores": scores}
    (root / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| method | steps | wall s | train s | tokens seen | tok/s | held-out NLL | held-out KL to teacher "
          "| held-out reward |\n|---|---|---|---|---|---|---|---|---|")
    b = scores["base"]
    print(f"| base student (no training) | 0 | – | – | – | – | {b['nll']:.3f} | {b['kl']:.3f} | {b['reward']:.2f} |")
    for m, r in results.items():
        s = scores[m]
        print(f"| {m} | {r['steps']} | {r['wall_s']} | {r['train_runtime_s']} | {r['tokens_seen']} | "
              f"{r['tokens_per_s']} | {s['nll']:.3f} | {s['kl']:.3f} | {s['reward']:.2f} |")


if __name__ == "__main__":
    main()
