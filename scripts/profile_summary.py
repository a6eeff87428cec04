"""Summarise a py-spy profile of a toushi stage: where the samples went, by phase and by hot function.

    pip install py-spy
    rm -rf runs/tiny-cpu/eval           # the stage's caches would make the rerun do nothing
    py-spy record -r 20 -f raw -o eval.txt -- toushi run recipes/tiny-cpu.yaml
    python scripts/profile_summary.py eval.txt

On a CPU vLLM's engine runs in toushi's process, so its model forward passes are in the same profile.
A sample's phase is the innermost PHASES frame on its stack; idle waits are left out. py-spy sees Python
threads only: the model's OpenMP threads work while the main thread waits in the op, so shares are of wall
time.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

# toushi functions (py-spy's "name (file:line)" frames, matched by prefix) that mark a phase: eval's parts,
# and engine start/stop, training launches, guidance and tagging for the other stages
PHASES = {"VLLMEngine.__init__": "vLLM engine start", "VLLMEngine.close": "vLLM engine stop",
          "generate_students": "students' answers", "heldout_nll": "held-out NLL", "run_judge": "judge",
          "run_seeker": "simulated seeker", "summarise": "summary (bootstrap CIs)", "run_stage (toushi/report": "report",
          "run_training_stage": "training (launched process)", "map_reduce": "guidance map-reduce",
          "tag_texts": "tagging"}
# model work inside vLLM, by layer kind (inclusive)
HOT = ("LlamaAttention.forward", "LlamaMLP.forward", "cpu_unquantized_gemm", "BaseLinearLayerWithLoRA._apply_lora_to_output",
       "LogitsProcessor.forward", "Sampler.forward", "apply_grammar_bitmask", "_update_states", "_prepare_inputs")
IDLE = ("Event.wait", "Condition.wait", "_worker", "select", "poll")


def summarise(path: Path) -> tuple[int, Counter, Counter]:
    total, phases, hot = 0, Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]
        if names and names[-1] in IDLE:
            continue
        total += int(n)
        phase = "other (imports, start-up, I/O)"
        for f in frames:
            for marker, label in PHASES.items():
                if f.startswith(marker):
                    phase = label
        phases[phase] += int(n)
        for h in HOT:
            if h in names:
                hot[h] += int(n)
    return total, phases, hot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, help="py-spy raw output (-f raw)")
    p.add_argument("--rate", type=float, default=20, help="py-spy's sampling rate (-r), to turn samples into s")
    args = p.parse_args()
    total, phases, hot = summarise(args.raw)
    print(f"{total} busy samples (~{total / args.rate:.0f} s of one thread)\n")
    print("| phase | share | ~s |\n|---|---|---|")
    for k, v in phases.most_common():
        print(f"| {k} | {v / total:.1%} | {v / args.rate:.0f} |")
    print("\n| inside the model (inclusive) | share |\n|---|---|")
    for k, v in hot.most_common():
        print(f"| {k} | {v / total:.1%} |")


if __name__ == "__main__":
    main()
