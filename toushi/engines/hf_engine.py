"""transformers engine: batched ``generate`` with left padding; the fallback where vLLM is missing.

Structured requests are constrained with xgrammar's transformers logits processor (xgrammar is vLLM's
default structured-output backend, so both engines follow the same grammar for a schema).

A reasoning model with a thinking budget or a constraint is run in two steps per sample, as vLLM's reasoning
support does in one: the think block free, up to the budget (then ``</think>`` is appended: close the think and
answer), and the answer after it, under the constraint. Stop strings end the answer, not the reasoning: vLLM's
detokenizer checks them over the think block too (vllm-project/vllm#52393), which the rehearsal's budget of one
token sidesteps.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import weakref
from collections.abc import Sequence

from toushi.engines import (
    Completion,
    Conversation,
    Engine,
    Structured,
    make_completion,
    mark_unstructured,
    per_conversation,
    per_conversation_lora,
    sample_seed,
    thinking_budget,
    top_logprobs,
)
from toushi.heap import release_freed_memory
from toushi.models import resolve_model
from toushi.recipe import ModelSpec, Sampling
from toushi.think import CLOSE, OPEN, prompt_think_tail


def before_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was there: generate stops *after* a stop string, and
    the answer ends before it (as vLLM's and the OpenAI API's answers do)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)


class HFEngine(Engine):
    def __init__(self, spec: ModelSpec):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        path = resolve_model(spec.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        if spec.lora_adapters:
            from peft import PeftModel

            names = list(spec.lora_adapters)
            model = PeftModel.from_pretrained(model, str(spec.lora_adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(spec.lora_adapters[name]), adapter_name=name)
        self.model = model.eval()
        self.device = device
        self._compiler = None  # xgrammar's grammar compiler, built on the first structured request
        self._stoppers: dict[tuple[str, ...], object] = {}  # stop strings -> their StopStringCriteria

    def _grammar(self, constraint: Structured):
        import xgrammar as xgr

        if self._compiler is None:
            # the model's vocabulary can be larger than the tokenizer's (padding rows)
            vocab = self.model.get_output_embeddings().weight.shape[0]
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab)
            self._compiler = xgr.GrammarCompiler(info)
        if constraint.json_schema is not None:  # no free whitespace, as the vLLM engine is configured
            return self._compiler.compile_json_schema(json.dumps(constraint.json_schema), any_whitespace=False)
        return self._compiler.compile_regex(constraint.as_regex())

    def generate(
        self,
        conversations: list[Conversation],
        sampling: Sampling,
        lora_name: str | None | Sequence[str | None] = None,
        structured: Structured | Sequence[Structured | None] | None = None,
        logprobs: int | None = None,
    ) -> list[list[Completion]]:
        self.check_lora(lora_name)
        names = per_conversation_lora(lora_name, len(conversations))
        constraints = per_conversation(structured, len(conversations))
        # one adapter per batch (PEFT switches adapters per model call), and constrained and free
        # conversations in separate batches (the grammar processor covers every row)
        results: list[list[Completion] | None] = [None] * len(conversations)
        for name in dict.fromkeys(names):
            if self.spec.lora_adapters and name is not None:
                self.model.set_adapter(name)
            if self.spec.reasoning and (self.spec.thinking_budget is not None or any(constraints)):
                for i in (i for i, n in enumerate(names) if n == name):
                    results[i] = [self._reason_then_answer(conversations[i], constraints[i], sampling, k, name,
                                                           logprobs) for k in range(sampling.n)]
                continue
            for free in (True, False):
                idx = [i for i, c in enumerate(constraints) if (c is None) == free and names[i] == name]
                if idx:
                    outs = self._generate([conversations[i] for i in idx], [constraints[i] for i in idx], sampling,
                                          name, logprobs)
                    for i, out in zip(idx, outs):
                        results[i] = out
        return results

    def _generate(self, conversations, constraints, sampling: Sampling, lora_name, logprobs) -> list[list[Completion]]:
        import torch

        bs = self.spec.hf_batch_size
        prompts_all = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                       for c in conversations]
        # batches of similar prompt lengths: less left padding to attend over (results go back in order)
        order = sorted(range(len(conversations)), key=lambda i: len(prompts_all[i]))
        results: list[list[Completion] | None] = [None] * len(conversations)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            batch_constraints = [constraints[i] for i in idx]
            grammars = [self._grammar(c) for c in batch_constraints] if batch_constraints[0] is not None else None
            prompts = [prompts_all[i] for i in idx]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            per_conv: list[list[Completion]] = [[] for _ in idx]
            # One generate call per sample index k with seed+k (as the vLLM engine does per request).
            for k in range(sampling.n):
                kwargs = self._sampling_kwargs(sampling, k)
                if grammars is not None:
                    from xgrammar.contrib.hf import LogitsProcessor

                    kwargs["logits_processor"] = [LogitsProcessor(grammars)]  # one use per generate call
                if logprobs is not None:
                    # scores after the logits processors: masked by the constraint, as vLLM reports them
                    kwargs.update(output_scores=True, return_dict_in_generate=True)
                t0 = time.perf_counter()
                with torch.inference_mode(), self._adapters(lora_name):
                    out = self.model.generate(**enc, **kwargs)
                latency = time.perf_counter() - t0
                seqs = out.sequences if logprobs is not None else out
                new = seqs[:, enc["input_ids"].shape[1] :]
                for i, row in enumerate(new):
                    top = self._top(out.scores, i, logprobs) if logprobs is not None else None
                    c = self._completion(row, enc["attention_mask"][i], sampling, latency, lora_name, top)
                    per_conv[i].append(mark_unstructured(c, batch_constraints[i]))
            for i, out in zip(idx, per_conv):
                results[i] = out
        return results

    def _sampling_kwargs(self, sampling: Sampling, k: int) -> dict:
        """generate() arguments for sample k (seeds torch's generator with the sample's seed)."""
        import torch

        seed = sample_seed(sampling, k)
        if seed is not None:
            torch.manual_seed(seed)
        greedy = sampling.temperature == 0
        kwargs = dict(max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                      pad_token_id=self.tokenizer.pad_token_id)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:  # the model's generation_config may carry sampling defaults; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs["stopping_criteria"] = [self._stopper(tuple(sampling.stop))]
        return kwargs

    def _stopper(self, stop: tuple[str, ...]):
        """The stop-string criterion for ``stop``, built once: generate(stop_strings=...) rebuilds it from the
        whole vocabulary on every call (0.3-1 s on the 2-core AVX512-BF16 machine with SmolLM2's 49k
        vocabulary, more than a short answer takes to generate)."""
        if stop not in self._stoppers:
            from transformers import StopStringCriteria

            self._stoppers[stop] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        return self._stoppers[stop]

    def _reason_then_answer(self, conversation, constraint, sampling: Sampling, k: int, lora_name,
                            logprobs) -> Completion:
        """One sample of a reasoning model in two steps: the think block up to the budget (closed with
        ``</think>`` when the budget ends it), then the answer under the constraint. Logprobs cover the answer."""
        import torch

        open_id, close_id = self.tokenizer.convert_tokens_to_ids([OPEN, CLOSE])
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompt = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        eos = self.model.generation_config.eos_token_id
        eos_ids = [*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id]
        budget = thinking_budget(self.spec, sampling)
        room = sampling.max_tokens
        if budget is not None:  # counted as vLLM counts it: R1's prompt already holds "<think>\n"
            room = budget - prompt_think_tail(prompt[0].tolist(), open_id, close_id)
        kwargs = self._sampling_kwargs(sampling, k)
        thinking = {key: v for key, v in kwargs.items() if key != "stopping_criteria"}  # stops end the answer only
        t0 = time.perf_counter()
        thought = []  # a budget the prompt's own "<think>\n" spends: closed at once, as vLLM closes it
        if room > 0:
            with torch.inference_mode(), self._adapters(lora_name):
                out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), **{
                    **thinking, "max_new_tokens": min(room, sampling.max_tokens), "eos_token_id": [*eos_ids, close_id]})
            thought = out[0, prompt.shape[1]:].tolist()
        closed = close_id in thought
        ended = bool(set(thought) & set(eos_ids))
        budget_hit = budget is not None and not closed and not ended and len(thought) < sampling.max_tokens
        if budget_hit:
            thought.append(close_id)  # close the think and answer
        answer_ids, top = [], None
        left = sampling.max_tokens - len(thought)
        if (closed or budget_hit) and left > 0:
            step = torch.tensor([prompt[0].tolist() + thought], device=self.device)
            kwargs = {**kwargs, "max_new_tokens": left, "eos_token_id": eos_ids}
            if constraint is not None:
                from xgrammar.contrib.hf import LogitsProcessor

                kwargs["logits_processor"] = [LogitsProcessor([self._grammar(constraint)])]
            if logprobs is not None:
                kwargs.update(output_scores=True, return_dict_in_generate=True)
            with torch.inference_mode(), self._adapters(lora_name):
                out = self.model.generate(step, attention_mask=torch.ones_like(step), **kwargs)
            seqs = out.sequences if logprobs is not None else out
            answer_ids = seqs[0, step.shape[1]:].tolist()
            top = self._top(out.scores, 0, logprobs) if logprobs is not None else None
        cut = next((j for j, t in enumerate(answer_ids) if t in eos_ids), None)
        kept = answer_ids if cut is None else answer_ids[:cut]
        # decoded apart at </think> (a token of its own), so a stop string is looked for in the answer alone
        answer, at_stop = before_stop(self.tokenizer.decode(kept, skip_special_tokens=True), sampling.stop)
        stopped = cut is not None or ended or at_stop
        raw = self.tokenizer.decode(thought, skip_special_tokens=True) + answer
        c = make_completion(
            raw,
            opened_think=True,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt.shape[1],
            completion_tokens=len(thought) + len(kept) + (1 if cut is not None else 0),
            latency_s=time.perf_counter() - t0,
            model=lora_name or self.spec.name,
            logprobs=top[: len(kept)] if top is not None else None,
            budget_hit=budget_hit,
        )
        return mark_unstructured(c, constraint)

    def _top(self, scores, row: int, k: int) -> list[dict[str, float]]:
        """The k most likely tokens at each generated position of one row, from generate's scores."""
        import torch

        out = []
        for step in scores:
            lp = torch.log_softmax(step[row].float(), dim=-1)
            vals, ids = lp.topk(k)
            out.append(top_logprobs((self.tokenizer.decode([t]), v) for t, v in zip(ids.tolist(), vals.tolist())))
        return out

    def _completion(self, row, mask, sampling: Sampling, latency: float, lora_name: str | None,
                    logprobs: list[dict[str, float]] | None = None) -> Completion:
        ids = row.tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        cut = next((j for j, t in enumerate(ids) if t in eos_ids), None)
        kept = ids if cut is None else ids[:cut]
        text, at_stop = before_stop(self.tokenizer.decode(kept, skip_special_tokens=True), sampling.stop)
        stopped = cut is not None or at_stop
        return make_completion(
            text,
            opened_think=self.spec.reasoning,
            finish_reason="stop" if stopped or len(kept) < sampling.max_tokens else "length",
            prompt_tokens=int(mask.sum()),
            completion_tokens=len(kept) + (1 if cut is not None else 0),
            latency_s=latency,
            model=lora_name or self.spec.name,
            logprobs=logprobs[: len(kept)] if logprobs is not None else None,
        )

    def _adapters(self, lora_name: str | None):
        """Base model (adapters disabled) when no adapter is asked for on a model that has some."""
        if self.spec.lora_adapters and lora_name is None:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def close(self) -> None:
        import torch

        # A transformers or PEFT model is freed by its reference counts once dropped. A full collection walks the
        # whole heap (0.6 s with torch, transformers and vLLM imported and not frozen, as after a vLLM engine's
        # close: 2-core AMD EPYC, AVX512-BF16 kind), so it runs only where something of the model outlived the drop.
        held = [weakref.ref(self.model), *map(weakref.ref, self.model.parameters())] if self.model is not None else []
        self.model = None
        if any(ref() is not None for ref in held):
            gc.collect()
        release_freed_memory()  # the model's memory back to the kernel, not kept in this process's heap
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

