"""On-policy distillation helpers for train/distill.py: the teacher's prompts, and a thin wrapper of TRL's
DistillationTrainer that lets the teacher read a different prompt (the compatibility check: toushi.preflight).

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

import torch
from trl import DistillationTrainer
from trl.trainer.utils import pad


def slice_rows(model, rows: int) -> None:
    """Cut a model's embedding and lm_head to its first ``rows`` rows (padding only: see preflight.check_teacher)."""
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
    ``unscored_ids`` (see preflight.check_teacher) out of the loss.
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
                      answer: str, teacher_memo: dict | None = None) -> dict:
    """Per-token reverse KL(student || teacher) and the student's NLL over ``answer`` (the student's tokens and
    its end-of-turn), the student reading ``student_conv`` and the teacher ``teacher_prompt`` ids before the same
    answer tokens: what the distill loss measures on sampled answers, here on a fixed one (eval, tests, bench).
    ``teacher_memo``: one dict passed with every student measured keeps the teacher's logits per teacher object
    and (prompt, answer) tokens, so its forward pass runs once, not once a student (a teacher whose weights change
    in place, e.g. by toggling an adapter, needs a fresh dict)."""
    prompt = student_tok.apply_chat_template(student_conv, add_generation_prompt=True, tokenize=False)
    full = student_tok.apply_chat_template(student_conv + [{"role": "assistant", "content": answer}], tokenize=False)
    p_ids = student_tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = student_tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    n = len(a_ids)
    # the head only where an answer token is predicted (the last n + 1 positions, the very last predicting past it)
    s_logits = student(input_ids=torch.tensor([p_ids + a_ids]), logits_to_keep=n + 1).logits[0, :-1].float()
    # keyed on the teacher itself (a module hashes by identity), not its id(): the key keeps it alive, so another
    # teacher built later cannot take its id and be handed its logits
    memo, key = (teacher_memo if teacher_memo is not None else {}), (teacher, tuple(teacher_prompt), tuple(a_ids))
    if key not in memo:
        memo[key] = teacher(input_ids=torch.tensor([teacher_prompt + a_ids]), logits_to_keep=n + 1).logits[0, :-1].float()
    t_logits = memo[key]
    rows = min(s_logits.shape[-1], t_logits.shape[-1])
    s_logp = torch.log_softmax(s_logits[:, :rows], -1)
    t_logp = torch.log_softmax(t_logits[:, :rows], -1)
    kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    nll = -s_logp.gather(1, torch.tensor(a_ids).unsqueeze(1)).squeeze(1)
    return {"tokens": n, "kl": float(kl.mean()), "nll": float(nll.mean())}
