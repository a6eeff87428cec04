"""The common base of toushi's own errors.

Each module keeps its own error class (CorpusError, PairsIncomplete, TrainingFailed, ...) so callers can catch
what they handle; every one also derives from ToushiError, so the command line turns any of them into one line
for the user (its message names the file, key or model and what to do) instead of a traceback.
"""

from __future__ import annotations


class ToushiError(Exception):
    """An error whose message is written for the person running toushi."""
