"""Helpers of the corpus's model steps (rewrite, personas): reading a post out of model output.

Their model calls go through :class:`toushi.calls.Calls` (cached by content in the corpus stage's ``calls/``
store), as every stage's do.
"""

from __future__ import annotations

import json


def strip_wrapping(text: str) -> str:
    """Model output -> the post: no surrounding quotes, no 'Here is the post:' lead-in line."""
    text = text.strip()
    lines = text.split("\n")
    if len(lines) > 1 and lines[0].rstrip().endswith((":", "：")) and len(lines[0]) < 80:
        text = "\n".join(lines[1:]).strip()
    pairs = [('"', '"'), ("“", "”"), ("'", "'"), ("「", "」")]
    for a, b in pairs:
        if len(text) > 2 and text.startswith(a) and text.endswith(b):
            text = text[1:-1].strip()
    return text


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
