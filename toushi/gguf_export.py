"""GGUF export for llama.cpp and Ollama, parity-checked through a GGUF reader.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py``, taken from the ``llama-cpp-python`` sdist (pinned
version and sha256), downloaded with pip on first use and cached under ``$TOUSHI_HOME/tools``: nothing of
llama.cpp is vendored here. The converter runs with the ``gguf`` package of the same llama.cpp tree (gguf-py):
the ``gguf`` release on the package index (0.19.0) predates the converter's ``LazyChunkedTensor``.

The check reads the written file back with transformers' GGUF loader (weights, tokenizer and chat template
from the GGUF's metadata, as llama.cpp and Ollama see them) and compares its greedy answers with the merged
model's on the same prompts as the merge check (``toushi.parity``). A ``Modelfile`` for Ollama goes beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from toushi.export import ExportError
from toushi.paths import toushi_home

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# what the converter needs of the llama.cpp tree inside the sdist
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}  # -> parity tolerance key
MARKER = ".toushi_converter"


def converter() -> Path:
    """``convert_hf_to_gguf.py`` of the pinned llama.cpp, from the sdist fetched once (about 77 MB, shared with
    the twins' sources) and unpacked under ``$TOUSHI_HOME/tools``."""
    from toushi.fetch import FetchError, package_tarball

    final = toushi_home() / "tools" / LLAMA_CPP_PYTHON.replace("==", "-")
    if (final / MARKER).exists():
        return final / "convert_hf_to_gguf.py"
    try:
        sdist = package_tarball("pip", LLAMA_CPP_PYTHON, SDIST_SHA256)
    except FetchError as e:
        raise ExportError(f"llama.cpp's GGUF converter: {e}") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch.") as work:
        prefix = f"{SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        tree = Path(work) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix)
                if m.name.startswith(prefix) and any(rel == p or (p.endswith("/") and rel.startswith(p))
                                                     for p in CONVERTER_PARTS):
                    m.name = rel
                    members.append(m)
            tar.extractall(tree, members=members, filter="data")
        if not (tree / "convert_hf_to_gguf.py").exists():
            raise ExportError(f"{SDIST} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (tree / MARKER).write_text(f"{LLAMA_CPP_PYTHON} sha256={SDIST_SHA256}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tree, final)
    return final / "convert_hf_to_gguf.py"


def convert(model_dir: Path, out_file: Path, outtype: str, log: Path) -> Path:
    """Run llama.cpp's converter on a full (merged) model; its output goes to ``log``."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    script = converter()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_file.exists():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise ExportError(f"convert_hf_to_gguf.py failed on {model_dir} (log: {log}): {' | '.join(tail)}")
    return out_file


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template adds when a conversation has none (SmolLM2 and Qwen2.5 do):
    the student was trained under it, so Ollama must send it too."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return m.group(1) if m else None


def write_modelfile(out_dir: Path, gguf_name: str, model_dir: Path, name: str, temperature: float = 0.7) -> Path:
    """An Ollama Modelfile: the GGUF, a ChatML template where the model uses one, its end token as stop."""
    import jinja2
    from transformers import AutoTokenizer

    from toushi.templates import TEMPLATE_DIR

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    chatml = "<|im_start|>" in (tok.chat_template or "")
    stops = ["<|im_end|>"] if chatml else [tok.eos_token] if tok.eos_token else []

    text = jinja2.Template((TEMPLATE_DIR / "export" / "Modelfile.j2").read_text(encoding="utf-8")).render(
        name=name, gguf=gguf_name, chatml=chatml, stops=stops, temperature=temperature,
        system=default_system(tok) if chatml else None)
    path = Path(out_dir) / "Modelfile"
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


def gguf_answers(gguf_file: Path, prompts: list[str], max_tokens: int) -> list[dict]:
    """Greedy answers of the GGUF as transformers reads it (dequantized; tokenizer and template from the
    file's metadata)."""
    from toushi.models import _convert_gguf
    from toushi.parity import answers_of
    from toushi.recipe import ModelSpec

    with tempfile.TemporaryDirectory(prefix="toushi-gguf-read.") as tmp:
        _convert_gguf(Path(gguf_file), Path(tmp) / "model")
        return answers_of(ModelSpec(name=str(Path(tmp) / "model"), engine="hf", dtype="float32", hf_batch_size=1),
                          prompts, max_tokens)


def export_gguf(run_dir: Path, stage: str, out_dir: Path | None = None, *, outtype: str = "f16",
                n_prompts: int = 8, max_tokens: int = 48, allow_mismatch: bool = False, console=None) -> dict:
    """The stage's merged model (merged and parity-checked first when missing) as GGUF, checked against the
    merged model through transformers' GGUF reader; Modelfile, parity.json and model card beside it."""
    from toushi import parity
    from toushi.cards import write_model_card
    from toushi.export import merge_checked, run_recipe, saved_dtype
    from toushi.recipe import ModelSpec

    run_dir = Path(run_dir)
    merged = run_dir / stage / "merged"
    if not (merged / "config.json").exists():
        if console:
            console.print(f"gguf: no merged model in {merged}; merging {stage} first")
        merge_checked(run_dir, stage, merged, n_prompts=n_prompts, max_tokens=max_tokens,
                      allow_mismatch=allow_mismatch, console=console)
    recipe = run_recipe(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / stage / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{recipe.run.name}-{stage}"
    if console:
        console.print(f"gguf: converting {merged} with llama.cpp's convert_hf_to_gguf.py ({outtype}; the converter "
                      f"is fetched once into {toushi_home() / 'tools'})")
    gguf_file = convert(merged, out_dir / f"{name}-{outtype}.gguf", outtype, out_dir / "convert.log")

    prompts, source = parity.parity_prompts(run_dir, n_prompts, recipe.run.lang)
    if console:
        console.print(f"gguf: parity on {len(prompts)} {source}: the GGUF read back by transformers vs the merged model")
    candidates = {"gguf (transformers reader)": gguf_answers(gguf_file, prompts, max_tokens)}
    dtype = saved_dtype(merged)
    reference = ModelSpec(name=str(merged), engine="hf", dtype=dtype, hf_batch_size=1)
    result = {"reference": f"{merged} (transformers)", "gguf": gguf_file.name, "outtype": outtype,
              "prompt_source": source,
              **parity.check(reference, prompts, candidates, parity.tolerance(dtype, OUTTYPES[outtype]), max_tokens)}
    parity.write_result(result, out_dir / "parity.json")
    line = parity.summary_line(result)
    if not result["ok"] and not allow_mismatch:
        raise ExportError(f"{gguf_file}: the GGUF answers differently from the merged model ({line}); see "
                          f"{out_dir / 'parity.json'} (--allow-mismatch to keep it anyway)")
    write_modelfile(out_dir, gguf_file.name, merged, name)
    adapter = run_dir / stage / "adapter"
    base = str(merged)
    if (adapter / "adapter_config.json").exists():  # the card names the model the adapter was trained on
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path or base
    write_model_card(out_dir, run_dir, stage, base, merged=True, artifact=f"GGUF ({outtype}) for llama.cpp / Ollama",
                     parity={"prompts": len(prompts), "summary": line})
    return {"dir": str(out_dir), "gguf": str(gguf_file), "ok": result["ok"], "parity": line}
