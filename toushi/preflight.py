"""Pre-flight checks of model pairs that must agree token for token, from configs and tokenizers only (no weights).

- distill with ``teacher: strong``: the teacher scores the student's sampled tokens, so every id the student emits
  must mean the same token to the teacher (``check_teacher``: slice padding rows, leave end tokens the teacher
  reads otherwise out of the loss, or refuse with a reason); train/distill.py runs it before loading weights;
- serve: each trained adapter is served on the student's base model, so it must have been trained on a tokenizer
  with the student's ids.

``toushi check RECIPE`` prints both for a recipe (``check_recipe``): vocabulary and embedding sizes, end and pad
ids, special tokens that differ by id, whether each chat template's rendering survives tokenize/decode, and what
toushi does about each difference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from toushi.errors import ToushiError


class IncompatibleTeacher(ToushiError, ValueError):
    """Teacher and student cannot be distilled token by token; the message names both sizes or tokens."""


@dataclass
class TeacherFit:
    """What the pre-flight check found; ``notes`` say what was done about each difference (goes to the manifest)."""

    student_rows: int  # embedding / lm_head rows
    teacher_rows: int
    student_tokens: int  # len(tokenizer): ids a tokenizer can produce
    teacher_tokens: int
    rows: int  # the rows both models are cut to (the loss's vocabulary size)
    unscored_ids: list[int] = field(default_factory=list)  # student end tokens the teacher reads as another token
    same_chat_template: bool = True
    notes: list[str] = field(default_factory=list)


def check_teacher(student_config, student_tok, teacher_config, teacher_tok, student_end_ids: list[int]) -> TeacherFit:
    """Pre-flight check from configs and tokenizers only (no weights loaded): can the teacher score the student's
    tokens one for one?

    - Every id a student can emit must mean the same token to the teacher: ordinary (non-added) tokens must match
      id for id, else IncompatibleTeacher (different vocabularies need cross-tokenizer distillation, e.g. TRL's
      GOLD, which this stage does not do).
    - Embedding rows may differ only by padding (rows beyond every id both tokenizers produce, e.g. Qwen2.5-1.5B's
      151,936 vs Qwen2.5-7B's 152,064 for 151,665 tokens): both models are then cut to the smaller row count by
      slicing (``slice_rows``). Fewer rows than a tokenizer's ids is an IncompatibleTeacher naming both sizes.
    - The student's end-of-turn ids: where the teacher reads that id as another token (Qwen's ``<|im_end|>`` is
      R1-Distill's ``<｜Assistant｜>``), the teacher cannot say when to stop, so those positions are left out of
      the loss (``unscored_ids``).
    - Chat templates may differ: the teacher always reads its prompt in its own template; that is noted.
    """
    s_rows = int(student_config.get_text_config().vocab_size)
    t_rows = int(teacher_config.get_text_config().vocab_size)
    s_len, t_len = len(student_tok), len(teacher_tok)
    fit = TeacherFit(s_rows, t_rows, s_len, t_len, rows=min(s_rows, t_rows))

    # ordinary tokens, id for id (added/special tokens are compared below, for the ids that matter)
    s_added = set(student_tok.get_added_vocab().values())
    t_added = set(teacher_tok.get_added_vocab().values())
    s_vocab = {i: t for t, i in student_tok.get_vocab().items() if i not in s_added}
    t_vocab = {i: t for t, i in teacher_tok.get_vocab().items() if i not in t_added}
    differ = [i for i, tok in s_vocab.items() if t_vocab.get(i) != tok]
    if differ:
        examples = ", ".join(f"{i}: {s_vocab[i]!r} vs {t_vocab.get(i)!r}" for i in sorted(differ)[:3])
        raise IncompatibleTeacher(
            f"teacher and student tokenizers have different vocabularies: {len(differ)} of the student's "
            f"{len(s_vocab)} ordinary tokens have another id or none in the teacher's ({examples}); student "
            f"tokenizer {s_len} tokens / {s_rows} embedding rows, teacher {t_len} tokens / {t_rows} rows. "
            "Token-level distillation needs a shared vocabulary"
        )

    need = max(s_len, t_len)
    if s_rows != t_rows:
        if fit.rows < need:
            raise IncompatibleTeacher(
                f"embedding sizes differ beyond padding: student {s_rows} rows, teacher {t_rows} rows, but the "
                f"tokenizers produce ids up to {need - 1} (student {s_len} tokens, teacher {t_len}); the smaller "
                "model cannot score every token"
            )
        fit.notes.append(
            f"embedding rows differ only by padding (student {s_rows}, teacher {t_rows}; tokenizers {s_len} and "
            f"{t_len} tokens): both sliced to the first {fit.rows} rows"
        )
    elif s_len != t_len:
        fit.notes.append(f"tokenizers have {s_len} (student) and {t_len} (teacher) tokens; {s_rows} rows each")

    for i in student_end_ids:
        s_tok, t_tok = student_tok.convert_ids_to_tokens(i), teacher_tok.convert_ids_to_tokens(i)
        if s_tok != t_tok:
            fit.unscored_ids.append(i)
            fit.notes.append(
                f"end token {i} is {s_tok!r} to the student but {t_tok!r} to the teacher: left out of the loss "
                "(the teacher cannot say when the student should stop)"
            )
    fit.same_chat_template = (student_tok.chat_template or "") == (teacher_tok.chat_template or "")
    if not fit.same_chat_template:
        fit.notes.append("chat templates differ: the teacher reads each prompt in its own template")
    return fit




def end_ids(model_path: str, tok) -> list[int]:
    """Every id that ends the student's answer: the tokenizer's eos and the generation config's (end-of-turn)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({*ids, tok.eos_token_id} - {None})


# --------------------------------------------------------------------------------------- toushi check

# a two-turn chat whose rendering each template must give back after tokenize and decode
ROUND_TRIP = [{"role": "user", "content": "I failed my driving test. 我好难过。"},
              {"role": "assistant", "content": "That sounds really discouraging."},
              {"role": "user", "content": "Thanks for listening."}]


@dataclass
class Side:
    """One model of a pair, as the check sees it."""

    role: str  # "student", "teacher (strong)", "adapter sft", ...
    name: str
    rows: int | None = None
    tokens: int | None = None
    end: list[str] = field(default_factory=list)  # "151645 <|im_end|>"
    pad: str | None = None
    round_trip: str | None = None  # "ok" or what differs


@dataclass
class PairCheck:
    what: str  # "distill: teacher/student"
    a: Side
    b: Side
    special_differ: list[str] = field(default_factory=list)  # "151644: '<|im_start|>' vs '<｜User｜>'"
    actions: list[str] = field(default_factory=list)  # what toushi does about each difference
    refused: str | None = None  # why toushi refuses this pair

    @property
    def ok(self) -> bool:
        return self.refused is None


@functools.lru_cache(maxsize=8)
def _load(path: str):
    """Config and tokenizer of a model directory (read once per check: the student takes part in every pair)."""
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _side(role: str, name: str, path: str, config, tok) -> Side:
    def named(i: int | None) -> str | None:
        return None if i is None else f"{i} {tok.convert_ids_to_tokens(i)}"

    rows = int(config.get_text_config().vocab_size) if config is not None else None
    return Side(role, name, rows, len(tok), [named(i) for i in end_ids(path, tok)], named(tok.pad_token_id),
                _round_trip(tok))


def _round_trip(tok) -> str:
    """Whether a rendering of ROUND_TRIP comes back from tokenize + decode unchanged (ids that split or merge a
    template's markers would not)."""
    if not tok.chat_template:
        return "no chat template"
    text = tok.apply_chat_template(ROUND_TRIP, add_generation_prompt=True, tokenize=False)
    back = tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    if back == text:
        return "ok"
    at = next((i for i, (x, y) in enumerate(zip(text, back)) if x != y), min(len(text), len(back)))
    return f"differs at char {at}: {text[at:at + 20]!r} vs {back[at:at + 20]!r}"


def _special_differ(a_tok, b_tok) -> list[str]:
    ids = sorted(set(a_tok.get_added_vocab().values()) | set(b_tok.get_added_vocab().values()))
    a_names, b_names = a_tok.convert_ids_to_tokens(ids), b_tok.convert_ids_to_tokens(ids)
    return [f"{i}: {x!r} vs {y!r}" for i, x, y in zip(ids, a_names, b_names) if x != y]


def check_distill_pair(student_spec, teacher_spec) -> PairCheck:
    """The student and a strong teacher, as train/distill.py checks them before loading weights."""
    from toushi.models import resolve_model

    s_path, t_path = resolve_model(student_spec.name), resolve_model(teacher_spec.name)
    (s_cfg, s_tok), (t_cfg, t_tok) = _load(s_path), _load(t_path)
    pair = PairCheck("distill: student / teacher (strong)", _side("student", student_spec.name, s_path, s_cfg, s_tok),
                     _side("teacher", teacher_spec.name, t_path, t_cfg, t_tok), _special_differ(s_tok, t_tok))
    try:
        fit = check_teacher(s_cfg, s_tok, t_cfg, t_tok, end_ids(s_path, s_tok))
    except IncompatibleTeacher as e:
        pair.refused = str(e)
    else:
        pair.actions = fit.notes or ["none needed: same vocabulary, rows, end tokens and template"]
    return pair


def check_adapter_pair(student_spec, stage: str, adapter: Path) -> PairCheck:
    """A trained adapter and the student it is served on: the tokenizer it was trained with must be the student's."""
    import json

    from toushi.models import resolve_model

    s_path = resolve_model(student_spec.name)
    s_cfg, s_tok = _load(s_path)
    from transformers import AutoTokenizer

    a_tok = AutoTokenizer.from_pretrained(adapter)  # saved with the adapter by training
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    pair = PairCheck(f"serve: student / {stage} adapter", _side("student", student_spec.name, s_path, s_cfg, s_tok),
                     _side(f"{stage} adapter", str(adapter), str(adapter), None, a_tok), _special_differ(s_tok, a_tok))
    same_vocab = s_tok.get_vocab() == a_tok.get_vocab()
    if not same_vocab:
        pair.refused = (f"the {stage} adapter was trained with another tokenizer ({len(a_tok)} tokens, the student "
                        f"has {len(s_tok)}): serving it on the student would read its ids as other tokens")
    else:
        pair.actions = [f"served by name ({stage}) on the student's base (trained on {base})"]
    return pair


def check_recipe(recipe) -> list[PairCheck]:
    """Every model pair of the recipe that must agree token for token (none: an empty list)."""
    from toushi.engines.adapters import run_adapters

    pairs = []
    models = recipe.models
    if "distill" in recipe.run.stages and recipe.distill.teacher == "strong" and models.student and models.strong:
        pairs.append(check_distill_pair(models.student, models.strong))
    if models.student is not None:
        for stage, adapter in run_adapters(recipe.run_dir).items():
            pairs.append(check_adapter_pair(models.student, stage, adapter))
    return pairs
