"""Benchmark the cost of constrained (structured) vs free decoding on the same prompts (not a test).

    python scripts/bench_structured.py [--prompts 16] [--max-tokens 128] [--engines vllm,hf]

The same prompts (posts from data/venting_en.jsonl, each wrapped in the persona-style request "describe
the poster as JSON") go, greedy, through each engine twice: free, then under a JSON schema (the corpus
stage's persona schema, toushi.corpus.personas.PERSONA_SCHEMA). The engine is loaded once, warmed up on
two short requests of each kind, and each pass is one timed ``generate`` call over all prompts. Output
tok/s = completion tokens / wall time of that call; the share of constrained outputs that parse and
match the schema is reported beside it. Results go to runs/bench/structured.json and one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from itertools import cycle, islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toushi.corpus.personas import PERSONA_SCHEMA
from toushi.engines import Structured, make_engine
from toushi.recipe import ModelSpec, Sampling
from toushi.store import atomic_write_text, package_versions, read_jsonl

REPO = Path(__file__).resolve().parent.parent
ASK = ("Here is a social-media post. Describe the person who wrote it as a JSON object with age, occupation, "
       "life_situation, mbti and writing_style.\n\nPost: {post}")


def load_prompts(n: int) -> list[list[dict]]:
    posts = [r["text"][:600] for r in read_jsonl(REPO / "data" / "venting_en.jsonl")]
    return [[{"role": "user", "content": ASK.format(post=p)}] for p in islice(cycle(posts), n)]


def spec_for(engine: str) -> ModelSpec:
    return ModelSpec(name="smollm2-135m-instruct", engine=engine, dtype="float32", enforce_eager=True,
                     max_model_len=2048, kv_cache_gb=1.0, hf_batch_size=16)


def timed(engine, convs, sampling, structured) -> dict:
    t0 = time.perf_counter()
    out = engine.generate(convs, sampling, structured=structured)
    wall = time.perf_counter() - t0
    tokens = sum(c[0].completion_tokens for c in out)
    valid = sum(structured.check(c[0].text) for c in out) if structured else None
    return {"wall_s": round(wall, 2), "completion_tokens": tokens, "tok_s": round(tokens / wall, 1),
            "valid": valid, "n": len(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", default="vllm,hf")
    args = ap.parse_args()
    convs = load_prompts(args.prompts)
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    schema = Structured(json_schema=PERSONA_SCHEMA)
    results = {}
    for name in args.engines.split(","):
        with make_engine(spec_for(name)) as engine:
            warm = Sampling(temperature=0.0, max_tokens=8)
            engine.generate(convs[:2], warm)
            engine.generate(convs[:2], warm, structured=schema)
            results[name] = {"free": timed(engine, convs, sampling, None),
                             "json_schema": timed(engine, convs, sampling, schema)}
        print(name, json.dumps(results[name]), flush=True)
    meta = {"prompts": args.prompts, "max_tokens": args.max_tokens, "machine": platform.machine(),
            "versions": package_versions()}
    out = REPO / "runs" / "bench" / "structured.json"
    atomic_write_text(out, json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print("| engine | decoding | out tok/s | completion tokens | wall s | schema-valid |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        for kind, v in r.items():
            valid = "–" if v["valid"] is None else f"{v['valid']}/{v['n']}"
            print(f"| {name} | {kind} | {v['tok_s']} | {v['completion_tokens']} | {v['wall_s']} | {valid} |")
        ratio = r["json_schema"]["tok_s"] / r["free"]["tok_s"] if r["free"]["tok_s"] else float("nan")
        print(f"{name}: constrained / free = {ratio:.2f}x")


if __name__ == "__main__":
    main()
