"""Generation engines: one interface over offline vLLM, OpenAI-compatible servers and transformers.

``make_engine(spec).generate(conversations, sampling)`` takes a batch of chat conversations and returns,
for each, ``sampling.n`` :class:`Completion` objects in the same order. Sample ``k`` of a prompt is drawn
with seed ``sampling.seed + k`` on every engine that honours seeds, so a sample index is a stable cache
key. Engines hold a model (or a client): free them with ``close()`` or use them as context managers, so
the weak and strong models can run one after the other in one process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from toushi.metrics import has_markdown
from toushi.recipe import ModelSpec, Sampling
from toushi.think import split_think

Conversation = list[dict[str, str]]


class GenerationError(RuntimeError):
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
    flags: list[str] = field(default_factory=list)  # "empty", "unterminated_think", "markdown"

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
) -> Completion:
    """Build a Completion from raw model text: split off ``<think>`` reasoning and set the flags.

    ``reasoning`` is reasoning a server already separated (``reasoning_content``); the raw text is then
    the answer alone, though it is still checked for stray think tags.
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
    )


def sample_seed(sampling: Sampling, k: int) -> int | None:
    """Seed of sample ``k``: distinct per sample, the same for the same k whatever n is."""
    return None if sampling.seed is None else sampling.seed + k


class Engine:
    """Base class: ``generate`` plus resource handling."""

    spec: ModelSpec

    def generate(
        self, conversations: list[Conversation], sampling: Sampling, lora_name: str | None = None
    ) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_lora(self, lora_name: str | None) -> None:
        if lora_name is not None and lora_name not in self.spec.lora_adapters:
            known = ", ".join(self.spec.lora_adapters) or "none"
            raise ValueError(f"model {self.spec.name}: no LoRA adapter named {lora_name!r} (known: {known})")


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
