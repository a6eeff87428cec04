"""Split a reasoning model's output into its ``<think>`` reasoning and the answer.

R1-distill chat templates end the prompt with ``<think>\\n``, so the model's output usually holds only
the closing ``</think>``; other models write both tags. A think block that never closes (cut off by
max_tokens) is reported as ``unterminated``: its text is reasoning, never an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN = "<think>"
CLOSE = "</think>"


@dataclass(frozen=True)
class ThinkSplit:
    answer: str
    reasoning: str | None
    unterminated: bool


def split_think(text: str, opened: bool = False) -> ThinkSplit:
    """Split ``text`` into (answer, reasoning, unterminated).

    ``opened``: the prompt already opened a think block (R1-distill templates), so text with no
    ``</think>`` at all is reasoning that was cut off. The reasoning ends at the *last* ``</think>``:
    nested or repeated blocks stay inside the reasoning, and the answer never holds a closing tag.
    A ``<think>`` that opens after the last ``</think>`` and never closes is cut-off reasoning too.
    """
    if CLOSE in text:
        head, _, answer = text.rpartition(CLOSE)
        reasoning = head.split(OPEN, 1)[1] if head.lstrip().startswith(OPEN) else head
        reasoning = reasoning.strip()
        unterminated = False
        if OPEN in answer:  # a fresh block after the last close that never closed
            answer, _, tail = answer.partition(OPEN)
            reasoning = f"{reasoning}\n{tail.strip()}".strip()
            unterminated = True
        return ThinkSplit(answer.strip(), reasoning or None, unterminated)
    if OPEN in text:
        answer, _, reasoning = text.partition(OPEN)
        return ThinkSplit(answer.strip(), reasoning.strip() or None, True)
    if opened:
        return ThinkSplit("", text.strip() or None, True)
    return ThinkSplit(text.strip(), None, False)


def think_budget_hit(prompt_ids: list[int], output_ids: list[int], open_id: int, close_id: int, budget: int) -> bool:
    """Whether a thinking budget ended the reasoning, counted as vLLM counts it: the tokens after the last
    ``<think>`` (R1's prompt ends ``<think>\\n``, so its newline counts) up to the first ``</think>`` of the output.
    A block that never closed was ended by max_tokens, not by the budget."""
    if close_id not in output_ids:
        return False
    end = output_ids.index(close_id)
    before = output_ids[:end]
    if open_id in before:  # the model opened the block itself
        return len(before) - before.index(open_id) - 1 >= budget
    return prompt_think_tail(prompt_ids, open_id, close_id) + len(before) >= budget


def prompt_think_tail(prompt_ids: list[int], open_id: int, close_id: int) -> int:
    """Tokens of reasoning the prompt already holds: those after a ``<think>`` it opens and leaves open."""
    if open_id not in prompt_ids:
        return 0
    last_open = len(prompt_ids) - 1 - prompt_ids[::-1].index(open_id)
    return 0 if close_id in prompt_ids[last_open:] else len(prompt_ids) - last_open - 1
