"""The ``selftrain`` stage's pieces: the student answers its own training prompts; the answers it is sure of and
that pass the format check join the SFT set for another short round of training. The stage runs
``accelerate launch train/selftrain.py`` like the other trainers (toushi/launch.py); the script reads top to bottom,
this module holds what it checks and decides.

Each round r = 1..rounds:

1. sample ``samples_per_prompt`` answers per train prompt (pairs records, split == train) from the
   current student: the base plus the previous round's adapter; round 1 starts from the SFT adapter when
   the run has one, else from a fresh LoRA (which is the base model until trained);
2. confidence (``confidence: logprob``, the default) = mean token log-prob of each answer under the
   student's own untempered distribution (``compute_transition_scores`` on the raw logits: temperature
   shapes what is sampled, not how sure the model is of it), the end-of-turn token included, since choosing
   to stop is part of the answer; or (``confidence: judge``) the judge's 1-10 rubric score
   (``rewards.JudgeScorer`` through the call layer, cached in ``judge_cache/`` so a redone round asks again for
   nothing), asked only for answers that passed every other check, on an engine the trainer opens for the
   round's judging and frees before the round trains (as GRPO's judge reward opens its own);
3. keep an answer when its format reward is 1 (plain text, the post's language, no ``<think>``), it ended
   before ``max_new_tokens`` (at the end-of-turn token, or at a ``stop`` string: cut before it; a cut-off
   answer is never kept) and its confidence is above ``tau`` (log-prob) or ``judge_tau`` (judge score mapped
   to [-1, 1]); an unparseable verdict rejects (``judge_invalid``);
4. continue training the current adapter with TRL's SFTTrainer on the SFT set (``toushi.datasets.load_sft``,
   as the sft stage builds it) plus this round's kept answers. A round that keeps nothing does not train: the
   adapter carries over unchanged.

Outputs in ``runs/<run>/selftrain/``: ``rounds.jsonl`` (one line per finished round: counts, confidences,
train loss), ``rounds/<r>/samples.jsonl`` (every sample with its confidence and verdict),
``rounds/<r>/adapter`` and ``adapter/`` (the last adapter, what eval loads; absent when no round trained
and the run has no SFT adapter). A finished round is never redone; an interrupted one samples again with the
same seed and resumes its training from a checkpoint of the same fingerprint. Rounds belong to one setting
(:func:`round_key`: this section but ``rounds``, the sft section, the student, the seed, the SFT adapter's
weights, the prompts, the judge): another setting starts again from round 1, while raising ``rounds`` only adds
rounds.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from toushi.engines import cache_model
from toushi.engines.adapters import adapter_fingerprint
from toushi.errors import ToushiError
from toushi.recipe import Recipe
from toushi.rewards import JUDGE_SAMPLING, JudgeScorer, format_reward, unit_score
from toushi.store import StageStore, read_jsonl, repair_jsonl, stable_id
from toushi.training import load_student, lora_config


class SelfTrainError(ToushiError, RuntimeError):
    """Self-training cannot run; the message names the recipe key or stage output that is missing."""


# --------------------------------------------------------------------------------------- sampling


def answer_end(tok, ids: list[int], eos: set[int], stop: list[str], lead: str) -> tuple[str, int, bool]:
    """Where one sampled row's answer ends: (its text, its tokens, the one that ended it included, whether
    it finished). An end-of-turn token ends it; so does a stop string, the text cut before it; an answer that
    ran to the token budget is not finished. ``lead`` is the end of the prompt: generate() also stops on a stop
    string that began there (a first token "\n..." after the template's "assistant\n"), and such an answer was
    cut, not finished."""
    end = next((j for j, t in enumerate(ids) if t in eos), None)
    body = ids if end is None else ids[:end]
    text = lead + tok.decode(body, skip_special_tokens=True)
    # the first stop string that ends inside the answer (one wholly inside the prompt did not stop anything)
    hits = [(text.find(s, max(0, len(lead) - len(s) + 1)), s) for s in stop]
    at, s = min(((i, s) for i, s in hits if i >= 0), default=(-1, ""))
    if at < 0:
        return text[len(lead) :].strip(), len(ids) if end is None else end + 1, end is not None
    if at < len(lead):
        return text[len(lead) :].strip(), len(body), False  # tokens after the cut are padding
    # the fewest tokens whose text holds the stop string: the one that completed it is the answer's last
    lo, hi = 1, len(body)
    while lo < hi:
        mid = (lo + hi) // 2
        if s in tok.decode(body[:mid], skip_special_tokens=True):  # this stop lies wholly in the answer
            hi = mid
        else:
            lo = mid + 1
    return text[len(lead) : at].strip(), lo, True


def sample_answers(model, tok, convs: list[list[dict]], n: int, max_new_tokens: int, temperature: float,
                   batch_size: int, stop: list[str]) -> list[list[dict]]:
    """n sampled answers per conversation: [{"text", "confidence", "finished", "tokens"}] each. An answer
    ends at the end-of-turn token or at a stop string (cut before it); one that reached max_new_tokens first is
    not finished."""
    import torch

    eos = {tok.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    eos.discard(None)
    tok.padding_side = "left"  # prompts of different lengths end where generation starts
    longest = max((len(s) for s in stop), default=1)
    # built once, not per batch: generate(stop_strings=...) rebuilds this from the whole vocabulary on each call
    stopping = {}
    if stop:
        from transformers import StopStringCriteria

        stopping = {"stopping_criteria": [StopStringCriteria(tokenizer=tok, stop_strings=stop)]}
    out: list[list[dict]] = []
    model.eval()
    for start in range(0, len(convs), batch_size):
        batch = convs[start : start + batch_size]
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **enc, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                num_return_sequences=n, output_logits=True, return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id, **stopping,
            )
            # raw logits, renormalised: log p(token) under the untempered model
            logp = model.compute_transition_scores(gen.sequences, gen.logits, normalize_logits=True)
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        for i, prompt in enumerate(texts):
            lead = prompt[-longest:]
            answers = []
            for row in range(i * n, (i + 1) * n):  # num_return_sequences keeps each prompt's samples together
                ids = new[row].tolist()
                text, scored, finished = answer_end(tok, ids, eos, stop, lead)
                answers.append({  # tokens after the end are padding: not scored
                    "text": text,
                    "confidence": round(float(logp[row, :scored].mean()), 4),
                    "finished": finished,
                    "tokens": scored,
                })
            out.append(answers)
    return out


REJECT_REASONS = ("format", "truncated", "confidence", "judge", "judge_invalid")


def verdict(answer: dict, post: str, tau: float | None = None,
            judge_tau: float | None = None) -> list[str]:
    """Why an answer is rejected (empty list: kept). ``tau`` checks the log-prob confidence; ``judge_tau``
    checks ``answer["judge_score"]`` (1-10 or None) when the answer has one; None skips either check. An answer
    cut off at the token budget is always rejected: it is never a training target."""
    reasons = []
    if format_reward(answer["text"], post) != 1.0:
        reasons.append("format")
    if not answer["finished"]:
        reasons.append("truncated")
    if tau is not None and not answer["confidence"] > tau:
        reasons.append("confidence")
    if judge_tau is not None and "judge_score" in answer:
        score = answer["judge_score"]
        if score is None:
            reasons.append("judge_invalid")
        elif not unit_score(score) > judge_tau:
            reasons.append("judge")
    return reasons


def judge_spec(recipe: Recipe):
    """The judge of ``confidence: judge``: models.judge, else models.strong."""
    spec = recipe.models.judge or recipe.models.strong
    if spec is None:
        raise SelfTrainError("selftrain.confidence: 'judge' needs models.judge (or models.strong) in the recipe")
    return spec


@contextmanager
def judging(spec, store: StageStore):
    """The rubric scorer on an engine for ``spec`` (its calls cached in ``store``), for one round's judging. On
    leaving, the engine is closed: the round trains next, in this process, and needs the memory."""
    from toushi.engines import make_engine

    engine = make_engine(spec)
    try:
        yield JudgeScorer(engine, JUDGE_SAMPLING, store, cache_model(spec))
    finally:
        engine.close()


# --------------------------------------------------------------------------------------- the student


def train_prompts(pairs: list[dict], max_prompts: int | None) -> list[dict]:
    """Train-split pairs records in a stable order (by id), capped at max_prompts."""
    train = sorted((r for r in pairs if r.get("split") == "train"), key=lambda r: r["id"])
    return train[:max_prompts] if max_prompts else train


def load_round_model(recipe: Recipe, model_path: str, adapter_in: Path | None, bf16: bool):
    """The current student, trainable: base + adapter_in, or base + a fresh LoRA."""
    import torch
    from peft import PeftModel, get_peft_model

    cfg, student = recipe.selftrain, recipe.models.student
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    if torch.cuda.is_available() and not cfg.lora.qlora:
        from accelerate import PartialState

        model = model.to(PartialState().device)  # this process's device; QLoRA is placed on load
    if adapter_in is not None:
        return PeftModel.from_pretrained(model, str(adapter_in), is_trainable=True)
    lora = cfg.lora
    return get_peft_model(model, lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules, "selftrain.lora"))


# --------------------------------------------------------------------------------------- rounds


def round_key(recipe: Recipe, model_path: str, prompts: list[dict], sft_examples: list[dict], start: Path | None,
              judge) -> str:
    """The setting rounds belong to: this section but ``rounds`` (raising it only adds rounds), the sft section,
    the student, the seed, the SFT adapter's weights, the prompts, the SFT set and the judge. Files by content: the
    student's weights (a directory merged again in place is another student), a chat template file, the judge as
    the call cache names it."""
    from toushi.digests import path_digest
    from toushi.training import base_model_digest

    cfg = recipe.selftrain
    template = cfg.train.chat_template
    return stable_id(cfg.model_dump(mode="json", exclude={"rounds"}), recipe.sft.model_dump(mode="json"),
                     recipe.models.student.model_dump(mode="json"), base_model_digest(model_path),
                     path_digest(template) if template else None, recipe.run.seed,
                     adapter_fingerprint(start) if start else None, prompts, stable_id(sft_examples),
                     [judge.model_dump(mode="json"), cache_model(judge)] if judge else None)


def finished_rounds(path: Path, key: str, rounds: int) -> list[dict]:
    """Rounds 1..k already done for this setting (contiguous, adapters on disk); [] after a setting change."""
    if not path.exists():
        return []
    repair_jsonl(path)
    recs = list(read_jsonl(path))
    if any(rec["key"] != key for rec in recs):
        return []
    done = []
    for rec in sorted(recs, key=lambda x: x["round"]):
        out = rec["adapter_out"]
        if rec["round"] != len(done) + 1 or rec["round"] > rounds or (out and not Path(out).is_dir()):
            break
        done.append(rec)
    return done


