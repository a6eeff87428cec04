"""Generation engines: one interface over offline vLLM, OpenAI-compatible servers and transformers.

``make_engine(spec).generate(conversations, sampling)`` takes a batch of chat conversations and returns,
for each, ``sampling.n`` :class:`Completion` objects in the same order. A call may constrain its output
(``structured=``: a JSON schema, a regex or a list of choices, one for the batch or one per conversation)
and ask for the ``logprobs=k`` most likely tokens at each generated position. Sample ``k`` of a prompt is drawn
with seed ``sampling.seed + k`` on every engine that honours seeds, so a sample index is a stable cache
key. Engines hold a model (or a client): free them with ``close()`` or use them as context managers, so
the weak and strong models can run one after the other in one process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from toushi.errors import ToushiError
from toushi.metrics import has_markdown
from toushi.recipe import ModelSpec, Sampling, local_model_dir
from toushi.think import split_think

Conversation = list[dict[str, str]]


class GenerationError(ToushiError, RuntimeError):
    """A request that failed for good (after retries); the message names the model and the cause."""


@dataclass
class Completion:
    text: str  # the answer, reasoning stripped
    reasoning: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model: str
    # "empty", "unterminated_think", "think_budget_hit", "truncated" (see is_truncated), "markdown", "unstructured"
    flags: list[str] = field(default_factory=list)
    # with logprobs=k: per generated token, the k most likely tokens (decoded text -> logprob); under a
    # constraint the engines report them after the constraint's mask, so they sum to ~1 over allowed tokens
    logprobs: list[dict[str, float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Completion:
        return cls(**d)


def make_completion(
    raw: str,
    *,
    reasoning: str | None = None,
    opened_think: bool = False,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    latency_s: float,
    model: str,
    logprobs: list[dict[str, float]] | None = None,
    budget_hit: bool = False,
) -> Completion:
    """Build a Completion from raw model text: split off ``<think>`` reasoning and set the flags.

    ``reasoning`` is reasoning a server already separated (``reasoning_content``); the raw text is then
    the answer alone, though it is still checked for stray think tags. ``budget_hit``: the engine's thinking
    budget closed the think block (flag ``think_budget_hit``).
    """
    split = split_think(raw, opened=opened_think and reasoning is None)
    if reasoning is not None:
        parts = [reasoning.strip(), split.reasoning or ""]
        reasoning_text = "\n".join(p for p in parts if p) or None
    else:
        reasoning_text = split.reasoning
    flags = []
    if not split.answer:
        flags.append("empty")
    if split.unterminated:
        flags.append("unterminated_think")
    if budget_hit:
        flags.append("think_budget_hit")
    if finish_reason == "length" or split.unterminated:
        flags.append("truncated")
    if has_markdown(split.answer):
        flags.append("markdown")
    return Completion(
        text=split.answer,
        reasoning=reasoning_text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=round(latency_s, 4),
        model=model,
        flags=flags,
        logprobs=logprobs,
    )


def is_truncated(completion: dict) -> bool:
    """Whether a completion (as stored in records) was cut off: it stopped at ``max_tokens``, or its think
    block never closed. Such an answer is never a training target, a chosen answer, a guidance example or
    a distillation prompt; it may still be a rejected one. Reads ``finish_reason`` too, so records written
    before the "truncated" flag existed are judged the same way."""
    flags = completion.get("flags") or ()
    return "truncated" in flags or "unterminated_think" in flags or completion.get("finish_reason") == "length"


def flag_counts(completions, role: str) -> dict[str, int]:
    """A stage manifest's counts of its completions' flags, ``{role}_{flag}``; ``{role}_truncated`` is
    always there (0 included), so a manifest says how many answers were cut off."""
    out = {f"{role}_truncated": 0}
    for c in completions:
        for f in set(c.get("flags") or ()) - {"truncated"}:
            out[f"{role}_{f}"] = out.get(f"{role}_{f}", 0) + 1
        out[f"{role}_truncated"] += is_truncated(c)
    return out


@dataclass(frozen=True)
class Structured:
    """A constraint on one request's output: exactly one of a JSON schema, a regex or a list of choices.

    vLLM (offline and server) and the hf engine enforce it while decoding; ``check`` tells whether a text
    satisfies it (for endpoints that cannot enforce it, and for callers that must count failures).
    """

    json_schema: dict | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.json_schema, self.regex, self.choices)) != 1:
            raise ValueError("Structured: give exactly one of json_schema, regex, choices")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def kind(self) -> str:
        """"json_schema", "regex" or "choices": what an endpoint may take or refuse."""
        return "json_schema" if self.json_schema is not None else "regex" if self.regex is not None else "choices"

    def key(self) -> dict:
        """A JSON-able description (for cache keys: a constrained call is not the free call)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}

    def as_regex(self) -> str | None:
        """Choices as an alternation regex (for backends without a choice constraint)."""
        if self.choices is not None:
            return "(" + "|".join(re.escape(c) for c in self.choices) + ")"
        return self.regex

    def check(self, text: str) -> bool:
        if self.choices is not None:
            return text.strip() in self.choices
        if self.regex is not None:
            return re.fullmatch(self.regex, text.strip(), re.S) is not None
        try:
            value = json.loads(text)
        except ValueError:
            return False
        import jsonschema

        return jsonschema.Draft202012Validator(self.json_schema).is_valid(value)


def per_conversation(structured: Structured | Sequence[Structured | None] | None, n: int) -> list[Structured | None]:
    """One constraint (or None) per conversation, from one for the whole batch or a list."""
    if structured is None or isinstance(structured, Structured):
        return [structured] * n
    if len(structured) != n:
        raise ValueError(f"structured: {len(structured)} constraints for {n} conversations")
    return list(structured)


def per_conversation_lora(lora_name: str | None | Sequence[str | None], n: int) -> list[str | None]:
    """One adapter name (or None: the base model) per conversation, from one for all or a list of n."""
    if lora_name is None or isinstance(lora_name, str):
        return [lora_name] * n
    if len(lora_name) != n:
        raise ValueError(f"lora_name: {len(lora_name)} adapter names for {n} conversations")
    return list(lora_name)


def mark_unstructured(completion: Completion, structured: Structured | None) -> Completion:
    """Flag a completion that breaks its constraint (a truncated JSON, a refused constraint)."""
    if structured is not None and not structured.check(completion.text):
        completion.flags.append("unstructured")
    return completion


def top_logprobs(candidates) -> dict[str, float]:
    """{decoded token: logprob} from (text, logprob) pairs: tokens the constraint masked (-inf) are left
    out, and distinct tokens that decode to the same text share one entry (their probabilities add)."""
    out: dict[str, float] = {}
    for text, lp in candidates:
        if lp == float("-inf"):
            continue
        out[text] = math.log(math.exp(out[text]) + math.exp(lp)) if text in out else float(lp)
    return out


def thinking_budget(spec: ModelSpec, sampling: Sampling) -> int | None:
    """The call's thinking budget: the spec's, cut to three quarters of max_tokens so the answer keeps a quarter."""
    if spec.thinking_budget is None:
        return None
    return max(1, min(spec.thinking_budget, sampling.max_tokens * 3 // 4))


def sample_seed(sampling: Sampling, k: int) -> int | None:
    """Seed of sample ``k``: distinct per sample, the same for the same k whatever n is."""
    return None if sampling.seed is None else sampling.seed + k


class Engine:
    """Base class: ``generate`` plus resource handling."""

    spec: ModelSpec

    def generate(
        self,
        conversations: list[Conversation],
        sampling: Sampling,
        lora_name: str | None | Sequence[str | None] = None,
        structured: Structured | Sequence[Structured | None] | None = None,
        logprobs: int | None = None,
    ) -> list[list[Completion]]:
        """Completions per conversation. ``lora_name`` and ``structured`` apply to all conversations or, as
        lists, one per conversation (several adapters in one batch)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_lora(self, lora_name: str | None | Sequence[str | None]) -> None:
        names = [lora_name] if lora_name is None or isinstance(lora_name, str) else lora_name
        for name in names:
            if name is not None and name not in self.spec.lora_adapters:
                known = ", ".join(self.spec.lora_adapters) or "none"
                raise ValueError(f"model {self.spec.name}: no LoRA adapter named {name!r} (known: {known})")


def cache_model(spec: ModelSpec) -> str:
    """The model as the call caches key it: its (served) name and, for a local engine, the dtype its weights
    run in. A changed dtype, or ``auto`` resolving to bf16 on one CPU and fp32 on another, gives other
    answers, so cached calls of the other dtype are not reused. A thinking budget cuts reasoning short and
    changes answers too, so it is part of the key when set. A local model directory is keyed by its files'
    content too: a teacher merged again into the same directory is another model."""
    name = spec.served_model or spec.name
    if spec.thinking_budget is not None:
        name = f"{name}|think<={spec.thinking_budget}"
    if spec.engine == "openai":  # the endpoint decides; its name is what we know
        return name
    if (local := local_model_dir(spec.name)) is not None:
        from toushi.digests import path_digest  # sha256 per file, remembered against size and mtime

        name = f"{name}|w={path_digest(local)}"
    return f"{name}|{run_dtype(spec)}"


def run_dtype(spec: ModelSpec) -> str:
    """The dtype a local engine's weights run in: vLLM's ``auto`` on a CPU is decided by the CPU
    (vllm_engine.resolve_dtype); the hf engine's ``auto`` is the checkpoint's own."""
    if spec.engine == "vllm":
        from toushi.engines.vllm_engine import resolve_dtype

        return resolve_dtype(spec.dtype)
    return spec.dtype


def make_engine(spec: ModelSpec) -> Engine:
    """The engine the spec names, with its model loaded (vllm, hf) or its client ready (openai)."""
    if spec.engine == "vllm":
        from toushi.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    if spec.engine == "hf":
        from toushi.engines.hf_engine import HFEngine

        return HFEngine(spec)
    from toushi.engines.openai_engine import OpenAIEngine

    return OpenAIEngine(spec)
