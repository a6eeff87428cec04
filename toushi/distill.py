"""On-policy distillation helpers for train/distill.py: the teacher/student compatibility check, the teacher's
prompts, and a thin wrapper of TRL's DistillationTrainer that lets the teacher read a different prompt.

Why a subclass at all: TRL's ``DistillationTrainer`` (trl 1.16) runs the teacher on exactly the student's
``prompt + completion`` ids. Both teachers here need another prompt before the same completion tokens:
``guided`` is the base model with the guidance (and retrieved examples) as its system prompt while the student
sees the bare prompt (on-policy context distillation), and ``strong`` is another model that reads the prompt in
its own chat template (and its own ``<think>`` block). TRL's SDFT trainer (trl.experimental.sdft) has teacher
prompts, but only as text appended to the user turn of the *student's own* base model, so it fits neither. The
override is two methods: the generated batch gains the teacher's prompt ids, and the teacher's backbone call
swaps the student prompt for them. The completion tokens are the last columns of both sequences, so the
teacher's hidden states line up with the student's completion positions token for token; TRL's chunked
generalised-JSD loss, generation, buffering and logging are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DistillationTrainer
from trl.trainer.utils import pad


class IncompatibleTeacher(ValueError):
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


def slice_rows(model, rows: int) -> None:
    """Cut a model's embedding and lm_head to its first ``rows`` rows (padding only: see check_teacher)."""
    if model.get_input_embeddings().weight.shape[0] != rows:
        model.resize_token_embeddings(rows)  # keeps the first `rows` rows of both matrices, updates config


# --------------------------------------------------------------------------------------- teacher prompts


def teacher_prompt_ids(tok, messages: list[dict], think: bool = False, reasoning: str | None = None) -> list[int]:
    """Token ids of a conversation's generation prompt in the teacher's chat template; a reasoning teacher
    (``think``) also gets its ``<think>`` block closed (see think_prefill), so what follows is the answer."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if think:
        text += think_prefill(text, reasoning)
    return tok(text, add_special_tokens=False)["input_ids"]


def think_prefill(prompt_text: str, reasoning: str | None) -> str:
    """What goes between a reasoning teacher's generation prompt and the student's answer: a closed ``<think>``
    block (empty, or the teacher's own reasoning for this prompt). Templates that already open ``<think>``
    (R1-Distill's newer ones) get only the rest of the block."""
    body = f"{reasoning.strip()}\n" if reasoning else "\n"
    if prompt_text.rstrip(" ").endswith("<think>\n"):
        return f"{body}</think>\n\n"
    return f"<think>\n{body}</think>\n\n"


# --------------------------------------------------------------------------------------- trainer


class TeacherPromptDistillationTrainer(DistillationTrainer):
    """TRL's DistillationTrainer, with the teacher reading ``teacher_prompt_ids`` (a dataset column: token ids in
    the teacher's tokenizer) before the student's sampled completion. See the module docstring for why.

    Also counts teacher forward calls and scored tokens (the manifest reports them), and leaves
    ``unscored_ids`` (see check_teacher) out of the loss.
    """

    def __init__(self, *args, unscored_ids: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscored_ids = list(unscored_ids or [])
        self.teacher_calls = 0
        self.teacher_tokens = 0
        self._teacher_prompt = None  # (ids, mask) of the micro-batch being scored

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["prompt_ids"].device
        ids = [torch.as_tensor(x["teacher_prompt_ids"], dtype=torch.long) for x in inputs]
        output["teacher_prompt_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id,
                                           padding_side="left").to(device)
        output["teacher_prompt_mask"] = pad([torch.ones_like(t) for t in ids], padding_value=0,
                                            padding_side="left").to(device)
        if self.unscored_ids:
            # the completion mask is the loss mask; the masked token is the last one, so no scored position
            # attends to it and zeroing its attention changes nothing else
            unscored = torch.isin(output["completion_ids"], torch.tensor(self.unscored_ids, device=device))
            output["completion_mask"] = output["completion_mask"] * (~unscored).long()
            output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self._teacher_prompt = (inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"])
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_prompt = None

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if self._teacher_prompt is not None and unwrapped_model is self.accelerator.unwrap_model(self.teacher_model):
            # the completion is the last `logits_to_keep` columns of the student's sequence: keep it, swap the prompt
            prompt_ids, prompt_mask = self._teacher_prompt
            input_ids = torch.cat([prompt_ids, input_ids[:, -logits_to_keep:]], dim=1)
            attention_mask = torch.cat([prompt_mask, attention_mask[:, -logits_to_keep:]], dim=1)
            self.teacher_calls += 1
            self.teacher_tokens += int(attention_mask[:, -logits_to_keep:].sum())
        return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)


# --------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def answer_divergence(student, student_tok, student_conv: list[dict], teacher, teacher_prompt: list[int],
                      answer: str) -> dict:
    """Per-token reverse KL(student || teacher) and the student's NLL over ``answer`` (the student's tokens and
    its end-of-turn), the student reading ``student_conv`` and the teacher ``teacher_prompt`` ids before the same
    answer tokens: what the distill loss measures on sampled answers, here on a fixed one (eval, tests, bench)."""
    prompt = student_tok.apply_chat_template(student_conv, add_generation_prompt=True, tokenize=False)
    full = student_tok.apply_chat_template(student_conv + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = student_tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = student_tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    n = len(a_ids)
    s_logits = student(input_ids=torch.tensor([p_ids + a_ids])).logits[0, -n - 1 : -1].float()
    t_logits = teacher(input_ids=torch.tensor([teacher_prompt + a_ids])).logits[0, -n - 1 : -1].float()
    rows = min(s_logits.shape[-1], t_logits.shape[-1])
    s_logp = torch.log_softmax(s_logits[:, :rows], -1)
    t_logp = torch.log_softmax(t_logits[:, :rows], -1)
    kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    nll = -s_logp.gather(1, torch.tensor(a_ids).unsqueeze(1)).squeeze(1)
    return {"tokens": n, "kl": float(kl.mean()), "nll": float(nll.mean())}
