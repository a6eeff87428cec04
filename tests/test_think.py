"""Reasoning split: complete blocks, R1-style missing open tag, cut-off blocks, odd nestings."""

from toushi.engines import make_completion
from toushi.think import split_think


def test_complete_block():
    s = split_think("<think>\nthey feel alone\n</think>\n\nThat sounds hard.")
    assert (s.answer, s.reasoning, s.unterminated) == ("That sounds hard.", "they feel alone", False)


def test_missing_open_tag_r1_style():
    s = split_think("they feel alone\n</think>\nThat sounds hard.", opened=True)
    assert (s.answer, s.reasoning, s.unterminated) == ("That sounds hard.", "they feel alone", False)


def test_unterminated_after_open_prompt_is_reasoning_not_answer():
    s = split_think("they feel alone and I should", opened=True)
    assert (s.answer, s.reasoning, s.unterminated) == ("", "they feel alone and I should", True)


def test_unterminated_with_open_tag():
    s = split_think("<think>let me think about")
    assert (s.answer, s.reasoning, s.unterminated) == ("", "let me think about", True)


def test_no_tags_plain_model():
    s = split_think("  That sounds hard.  ")
    assert (s.answer, s.reasoning, s.unterminated) == ("That sounds hard.", None, False)


def test_nested_blocks_stay_in_reasoning():
    s = split_think("<think>a <think>b</think> c</think>Answer.")
    assert s.answer == "Answer."
    assert s.reasoning == "a <think>b</think> c"
    assert not s.unterminated


def test_second_block_opened_after_answer_never_closed():
    s = split_think("<think>r</think>Part one. <think>more")
    assert s.answer == "Part one."
    assert s.reasoning == "r\nmore"
    assert s.unterminated


def test_empty_think_block():
    s = split_think("<think>\n\n</think>\n\nHi there.")
    assert (s.answer, s.reasoning, s.unterminated) == ("Hi there.", None, False)


def test_completion_flags():
    kw = dict(finish_reason="length", prompt_tokens=3, completion_tokens=5, latency_s=0.1, model="m")
    cut = make_completion("still thinking", opened_think=True, **kw)
    assert cut.flags == ["empty", "unterminated_think", "truncated"] and cut.text == ""
    # an answer that stopped at max_tokens is truncated even with its think block closed
    md = make_completion("</think>**You are not alone.**\n- breathe", opened_think=True, **kw)
    assert md.flags == ["truncated", "markdown"] and md.reasoning is None
    # reasoning a server already split off (reasoning_content) is kept, the answer is not re-split
    srv = make_completion("Plain answer.", reasoning="why", opened_think=True, **{**kw, "finish_reason": "stop"})
    assert (srv.text, srv.reasoning, srv.flags) == ("Plain answer.", "why", [])


def test_think_budget_hit_counts_as_vllm_does():
    from toushi.think import think_budget_hit

    open_, close = 151648, 151649
    r1_prompt = [151646, 151644, 17, 151645, open_, 198]  # R1's prompt ends <think>\n: the newline counts
    assert think_budget_hit(r1_prompt, [5, 6, 7, close, 9], open_, close, budget=4)
    assert not think_budget_hit(r1_prompt, [5, 6, close, 9], open_, close, budget=4)  # closed before the budget
    assert not think_budget_hit(r1_prompt, [5, 6, 7, 8, 9], open_, close, budget=4)  # never closed: max_tokens
    assert think_budget_hit([1, 2], [open_, 5, 6, close], open_, close, budget=2)  # the model opened it itself
    assert not think_budget_hit([1, open_, 3, close, 4], [5, close], open_, close, budget=2)  # prompt's block closed


def test_thinking_budget_needs_a_reasoning_model_and_leaves_room_to_answer():
    import pytest
    from pydantic import ValidationError

    from toushi.engines import cache_model, thinking_budget
    from toushi.recipe import ModelSpec, Sampling

    with pytest.raises(ValidationError, match="thinking_budget is for reasoning models"):
        ModelSpec(name="m", thinking_budget=64)
    spec = ModelSpec(name="m", engine="openai", reasoning=True, thinking_budget=3072)
    assert thinking_budget(spec, Sampling(max_tokens=4096)) == 3072
    assert thinking_budget(spec, Sampling(max_tokens=2048)) == 1536  # a quarter of the call left for the answer
    assert thinking_budget(spec.model_copy(update={"thinking_budget": None}), Sampling()) is None
    assert cache_model(spec) == "m|think<=3072"  # a budget changes answers: cached calls without it are not reused
    # a role's budget is per call (one engine serves roles with other budgets); the reasoning parser is not
    from toushi.engines.pool import engine_key

    local = ModelSpec(name="m", reasoning=True, thinking_budget=3072)
    assert engine_key(local) == engine_key(local.model_copy(update={"thinking_budget": 64}))
    assert engine_key(local) != engine_key(ModelSpec(name="m"))
