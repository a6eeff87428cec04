"""Benchmark generation throughput on the same prompts, in one run (not a test).

    python scripts/bench_generate.py [--prompts 128] [--max-tokens 128] [--hf-batch 32] [--concurrency 32]

The same unique prompts (ESConv openings from ../shared/data when present, else the team's posts, each
used once; wrapped in the pairs stage's support-task prompt, so no prompt repeats and prefix caching
flatters no engine) go, greedy, through:
- hf (fp32) and hf (bf16): toushi's transformers engine, batched, ``inference_mode``, KV cache;
- raw: ``vllm.LLM.chat`` called directly with the engine's own vLLM settings (the baseline toushi wraps);
- vllm: toushi's offline vLLM engine (goal: within 10% of raw);
- openai: the openai engine with ``--concurrency`` requests in flight against a vLLM server it starts.
Each is loaded, warmed up on two short requests, timed on one call over all prompts, and freed before the
next. Output tok/s = completion tokens / wall time of that call. Results go to runs/bench/generate.json and
a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toushi.engines import make_engine
from toushi.engines.server import VLLMServer
from toushi.hardware import cpu_kind, cpu_model
from toushi.pairs import conversation, task_prompt
from toushi.recipe import ModelSpec, Sampling
from toushi.store import atomic_write_text, package_versions, read_jsonl

REPO = Path(__file__).resolve().parent.parent
# what the CPU path should reach: toushi's wrapper within 10% of raw vLLM, vLLM well above transformers
TARGETS = {"vllm_over_raw": 0.9, "vllm_over_best_hf": 2.5, "openai_over_vllm": 0.7}


def load_prompts(n: int) -> list[list[dict]]:
    shared = REPO.parent / "shared" / "data" / "esconv_openings.jsonl"
    posts = [r["text"] for r in read_jsonl(REPO / "data" / "venting_en.jsonl")]
    if shared.exists():
        posts = [r["text"] for r in read_jsonl(shared)] + posts
    unique = list(dict.fromkeys(p.strip() for p in posts if p.strip()))
    if len(unique) < n:
        raise SystemExit(f"only {len(unique)} unique posts; ask for --prompts {len(unique)} or fewer")
    return [conversation(task_prompt(p, "en"), None) for p in unique[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpu_kind": cpu_kind(), "cores": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "platform": platform.platform()}


def timed(spec: ModelSpec, convs, sampling: Sampling) -> dict:
    """Load, warm up, then time one generate call over every prompt."""
    t0 = time.perf_counter()
    with make_engine(spec) as engine:
        load_s = time.perf_counter() - t0
        engine.generate(convs[:2], sampling.model_copy(update={"max_tokens": 4}))  # warm-up, not timed
        t1 = time.perf_counter()
        results = engine.generate(convs, sampling)
        wall = time.perf_counter() - t1
    return _row(load_s, wall, [c[0].completion_tokens for c in results], [c[0].text for c in results])


def timed_raw(spec: ModelSpec, convs, sampling: Sampling) -> dict:
    """The baseline: vllm.LLM.chat with the same engine settings, all prompts in one call."""
    from vllm import LLM, SamplingParams

    from toushi.engines.vllm_engine import cpu_engine_env, engine_kwargs

    # the same CPU settings toushi's engine gets (all cores for the model, the engine in this process, the
    # dtype): raw vLLM at its best, not as shipped for many-core machines
    extra = cpu_engine_env()
    os.environ.update(extra)
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(spec))
    load_s = time.perf_counter() - t0
    for k in extra:
        os.environ.pop(k, None)
    params = SamplingParams(temperature=0.0, max_tokens=sampling.max_tokens, seed=sampling.seed)
    llm.chat(convs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    t1 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    wall = time.perf_counter() - t1
    llm.llm_engine.engine_core.shutdown()
    del llm
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()  # the next engine starts in this same process
    return _row(load_s, wall, [len(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text.strip() for o in outs])


def _row(load_s: float, wall: float, tokens: list[int], texts: list[str]) -> dict:
    total = sum(tokens)
    print(f"  {total} tokens in {wall:.1f}s: {total / wall:.1f} out tok/s", flush=True)
    # Other processes on the machine skew CPU timings; the 1-minute load average says how much.
    return {"load_s": round(load_s, 1), "wall_s": round(wall, 2), "completion_tokens": total,
            "out_tok_s": round(total / wall, 1), "loadavg_1m_after": round(os.getloadavg()[0], 2), "texts": texts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=128, help="Number of unique prompts.")
    p.add_argument("--max-tokens", type=int, default=128, help="Most new tokens per completion.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="Model (default: the offline model).")
    p.add_argument("--hf-batch", type=int, default=32, help="Batch size of the hf engine.")
    p.add_argument("--concurrency", type=int, default=32, help="Requests in flight for the openai engine.")
    p.add_argument("--vllm-dtype", default="auto", help="dtype of the vLLM rows (auto: bf16 on a CPU with native bf16).")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM KV cache (GiB) for offline and server.")
    p.add_argument("--out", type=Path, default=Path("runs/bench/generate.json"))
    args = p.parse_args()

    convs = load_prompts(args.prompts)
    load_before = round(os.getloadavg()[0], 2)
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens, n=1, seed=0)
    # dtype auto: bf16 where the CPU computes it natively, as toushi's recipes run vLLM (the hf rows try both)
    vllm_spec = ModelSpec(name=args.model, engine="vllm", dtype=args.vllm_dtype, enforce_eager=True,
                          max_model_len=2048, kv_cache_gb=args.kv_cache_gb)
    results = {}
    # hf first: on a CPU vLLM's engine runs in this process and binds its OpenMP threads, which would then
    # also govern transformers' threads
    for dtype in ("float32", "bfloat16"):
        print(f"hf {dtype}: batch {args.hf_batch}", flush=True)
        results[f"hf_{dtype}"] = timed(
            ModelSpec(name=args.model, engine="hf", dtype=dtype, hf_batch_size=args.hf_batch), convs, sampling)
    print("raw vllm.LLM.chat", flush=True)
    results["raw"] = timed_raw(vllm_spec, convs, sampling)
    print("toushi vllm engine", flush=True)
    results["vllm"] = timed(vllm_spec, convs, sampling)
    print(f"openai: concurrency {args.concurrency} against a local vLLM server", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with VLLMServer(vllm_spec, port=free_port(), log_path=args.out.parent / "generate_server.log") as server:
        spec = ModelSpec(name=args.model, engine="openai", base_url=server.base_url, concurrency=args.concurrency,
                         timeout_s=1800, max_retries=0)
        results["openai"] = timed(spec, convs, sampling)

    vllm_texts = results["vllm"]["texts"]
    for r in results.values():  # greedy everywhere: how often an engine's answer equals vLLM offline's
        r["same_text_as_vllm"] = round(sum(a == b for a, b in zip(r.pop("texts"), vllm_texts)) / len(convs), 3)
    best_hf = max(results["hf_float32"]["out_tok_s"], results["hf_bfloat16"]["out_tok_s"])
    ratios = {
        "vllm_over_raw": round(results["vllm"]["out_tok_s"] / results["raw"]["out_tok_s"], 2),
        "vllm_over_best_hf": round(results["vllm"]["out_tok_s"] / best_hf, 2),
        "openai_over_vllm": round(results["openai"]["out_tok_s"] / results["vllm"]["out_tok_s"], 2),
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine(), "loadavg_1m_before": load_before}, "versions": package_versions(), "engines": results, "ratios": ratios,
        "targets": TARGETS, "targets_met": {k: ratios[k] >= t for k, t in TARGETS.items()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    print("\n| engine | out tok/s | completion tokens | wall s | load s | same text as vllm |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['out_tok_s']} | {r['completion_tokens']} | {r['wall_s']} | {r['load_s']} | "
              f"{r['same_text_as_vllm']:.0%} |")
    for k, v in ratios.items():
        print(f"{k}: {v}x (target >= {TARGETS[k]}x: {'met' if v >= TARGETS[k] else 'NOT met'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM re-imports the main module in its spawned engine process
    main()
