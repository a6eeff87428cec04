"""The venting corpus: loaders (loaders.py), dedup, sampling and split, model rewriting and personas, report.

``run_stage`` is the ``corpus`` stage (stage.py); the parts are plain functions usable on their own.
"""

from toushi.corpus.loaders import CorpusError, Post, load_source
from toushi.corpus.stage import run_stage

__all__ = ["CorpusError", "Post", "load_source", "run_stage"]
