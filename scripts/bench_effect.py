"""Benchmark: does each stage move the student toward its teacher? The planted trait of recipes/effect-cpu.yaml.

    python scripts/bench_effect.py [--out runs/bench-effect] [--set key=value ...]

1. `recipes/effect-cpu.yaml` end to end through the runner (every stage, training launched as `toushi run` does),
   reading ESConv's train split from ../shared/data/esconv/train.jsonl when the Hub cannot be reached;
2. two controls beside it: DPO with chosen and rejected swapped (toushi.effect.swapped_run), and distillation from
   a teacher that learned the trait (the SFT student, merged, as models.strong with teacher: strong);
3. on the held-out posts (none trained on), for every system: the rate at which its answers open as the teacher's
   do (toushi.effect.opening_rate: the probability of the planted opening words, read exactly from the first-token
   distribution), with a 95% bootstrap interval of its difference from the base student, paired by post;
4. the run's eval beside it (one full answer per post at the eval sampling): the apology-opening rate
   (metrics.apology_open) and its paired difference from the base student, the judge's win rate over weak and the
   seeker's change, so a reader sees what the 135M judge and seeker can and cannot see.
Writes <out>/bench.json and prints the Markdown table for docs/benchmarks.md. One run, as measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toushi.hardware import cpu_kind, cpu_model  # noqa: E402
from toushi.paths import repo_root  # noqa: E402

NOTES = {"student": "base student (no training)", "guided": "base + the guidance as system prompt",
         "distill": "distill, teacher: guided", "distill_sft": "distill, teacher: the SFT student (merged)",
         "dpo_swapped": "DPO, chosen/rejected swapped (control)", "grpo": "GRPO, opening reward"}


def launch(script: str, recipe: Path) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(repo_root() / "train" / f"{script}.py"),
           "--recipe", str(recipe)]
    subprocess.run(cmd, check=True)


def fmt(ci: dict, pct: bool = True) -> str:
    if ci.get("mean") is None:
        return "-"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:+.2f}")
    return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-effect"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override key=value")
    args = ap.parse_args()

    from toushi.effect import TRAIT_OPENERS, compare, opening_rates, swapped_run
    from toushi.export import merge
    from toushi.guidance import load_guidance
    from toushi.guided import guided_systems
    from toushi.models import resolve_model
    from toushi.recipe import load_recipe, save_recipe
    from toushi.runner import run_stages
    from toushi.stages import STAGES
    from toushi.store import StageStore

    out = args.out.resolve()
    shared = repo_root().parent / "shared" / "data" / "esconv" / "train.jsonl"
    base_sets = [f"run.dir={out}", *([f"corpus.sources.0.fallback={shared}"] if shared.exists() else []), *args.sets]
    recipe = load_recipe("recipes/effect-cpu.yaml", base_sets)
    t0 = time.time()
    times = {}
    run_stages(recipe, STAGES, quiet=True)  # --set "run.stages=[...]" to run (or resume) only some
    times["chain_s"] = round(time.time() - t0)
    run_dir = recipe.run_dir

    # controls: swapped DPO, and distillation from the SFT student
    t = time.time()
    swapped = load_recipe("recipes/effect-cpu.yaml", [*base_sets, f"run.name={recipe.run.name}-swapped"])
    if not (swapped.run_dir / "dpo" / "adapter").exists():
        swapped_run(run_dir, swapped.run_dir)
        launch("dpo", save_recipe(swapped, swapped.run_dir / "bench-recipe"))
    teacher = out / "sft-merged"
    if not (teacher / "config.json").exists():
        merge(run_dir / "sft" / "adapter", teacher, base=str(resolve_model(recipe.models.student.name)))
    by_sft = load_recipe("recipes/effect-cpu.yaml", [*base_sets, f"run.name={recipe.run.name}-distill-sft",
                                                      "distill.teacher=strong", f"models.strong.name={teacher}",
                                                      "models.strong.system_prompt_file=null"])
    if not (by_sft.run_dir / "distill" / "adapter").exists():
        for stage in ("corpus", "pairs"):
            shutil.copytree(run_dir / stage, by_sft.run_dir / stage, dirs_exist_ok=True)
        launch("distill", save_recipe(by_sft, by_sft.run_dir / "bench-recipe"))
    times["controls_s"] = round(time.time() - t)

    # the trait on held-out posts: opening rates of every system, and eval's apology rates
    t = time.time()
    pairs = StageStore(run_dir, "pairs").records()
    held = sorted((p for p in pairs if p["split"] == "heldout"), key=lambda p: p["id"])
    adapters = {"sft": run_dir / "sft" / "adapter", "dpo": run_dir / "dpo" / "adapter",
                "dpo_swapped": swapped.run_dir / "dpo" / "adapter", "distill": run_dir / "distill" / "adapter",
                "distill_sft": by_sft.run_dir / "distill" / "adapter", "grpo": run_dir / "grpo" / "adapter",
                "selftrain": run_dir / "selftrain" / "adapter"}
    adapters = {k: v for k, v in adapters.items() if (v / "adapter_config.json").exists()}
    guidance = load_guidance(run_dir / "guidance")
    guided = [s for _, s in guided_systems(held, pairs, guidance, recipe.guided.retrieved_examples, recipe.run.lang)]
    rates = opening_rates(resolve_model(recipe.models.student.name), adapters, [p["prompt"] for p in held], guided)
    opening = compare(rates, n_boot=1000, seed=recipe.run.seed)
    times["opening_rates_s"] = round(time.time() - t)
    first_word = {role: sum(p[role][0]["text"].split(" ", 1)[0] in TRAIT_OPENERS for p in held) / len(held)
                  for role in ("weak", "strong")}

    # eval's columns when the run's eval stage is complete (the judge alone is hundreds of calls on a CPU)
    summary_path = run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    by_system: dict[str, dict[str, float]] = {}
    for rec in StageStore(run_dir, "eval").records() if summary else []:
        by_system.setdefault(rec["system"], {})[rec["prompt_id"]] = rec["metrics"]["apology_open"]
    common = sorted(set.intersection(*(set(v) for v in by_system.values()))) if by_system else []
    apology = compare({s: [v[pid] for pid in common] for s, v in by_system.items()}, n_boot=1000,
                      seed=recipe.run.seed) if by_system else {}
    judge = (summary.get("judge") or {}).get("systems") or {}
    seeker = (summary.get("seeker") or {}).get("systems") or {}
    report = {"machine": f"{cpu_model()}, {cpu_kind()}", "seed": recipe.run.seed, "held_out_posts": len(held),
              "eval_posts": len(common), "times": times, "pairs_first_word_rates": first_word,
              "opening": opening, "eval_apology": apology, "judge": judge, "seeker": seeker}
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str))

    print(f"\nmachine: {report['machine']}; seed {report['seed']}; {len(held)} held-out posts for the opening rate, "
          f"{len(common)} of them in eval; times {times}")
    print(f"pairs answers on the held-out posts that open with the planted words: weak {100 * first_word['weak']:.0f}%, "
          f"strong {100 * first_word['strong']:.0f}%\n")
    print("| system | opens as the teacher (95% CI) | change vs base (paired) | eval: opens with an apology | "
          "change vs base (paired) | judge win rate vs weak | seeker change |")
    print("|---|---|---|---|---|---|---|")
    for s in ["student", "guided", *adapters]:
        o, a = opening.get(s), apology.get(s)
        j, k = (judge.get(s) or {}).get("win_rate"), (seeker.get(s) or {}).get("delta")
        print(f"| {NOTES.get(s, s)} | {fmt(o['rate']) if o else '-'} | "
              f"{fmt(o['vs_base'], pct=True) if o and s != 'student' else '-'} | {fmt(a['rate']) if a else '-'} | "
              f"{fmt(a['vs_base']) if a and s != 'student' else '-'} | {fmt(j, False) if j else '-'} | "
              f"{fmt(k, False) if k else '-'} |")

if __name__ == "__main__":
    main()
