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
