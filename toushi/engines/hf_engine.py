"""transformers engine: batched ``generate`` with left padding; the fallback where vLLM is missing."""

from __future__ import annotations

import contextlib
import gc
import time

from toushi.engines import Completion, Conversation, Engine, make_completion, sample_seed
from toushi.models import resolve_model
from toushi.recipe import ModelSpec, Sampling


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

    def generate(
        self, conversations: list[Conversation], sampling: Sampling, lora_name: str | None = None
    ) -> list[list[Completion]]:
        import torch

        self.check_lora(lora_name)
        if self.spec.lora_adapters and lora_name is not None:
            self.model.set_adapter(lora_name)
        bs = self.spec.hf_batch_size
        results: list[list[Completion]] = []
        for start in range(0, len(conversations), bs):
            batch = conversations[start : start + bs]
            prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            per_conv: list[list[Completion]] = [[] for _ in batch]
            # One generate call per sample index k with seed+k (as the vLLM engine does per request).
            for k in range(sampling.n):
                seed = sample_seed(sampling, k)
                if seed is not None:
                    torch.manual_seed(seed)
                greedy = sampling.temperature == 0
                kwargs = dict(
                    max_new_tokens=sampling.max_tokens,
                    do_sample=not greedy,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                if not greedy:
                    kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
                else:  # the model's generation_config may carry sampling defaults; greedy ignores them
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                if sampling.stop:
                    kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
                t0 = time.perf_counter()
                with torch.inference_mode(), self._adapters(lora_name):
                    out = self.model.generate(**enc, **kwargs)
                latency = time.perf_counter() - t0
                new = out[:, enc["input_ids"].shape[1] :]
                for i, row in enumerate(new):
                    per_conv[i].append(self._completion(row, enc["attention_mask"][i], sampling, latency, lora_name))
            results.extend(per_conv)
        return results

    def _completion(self, row, mask, sampling: Sampling, latency: float, lora_name: str | None) -> Completion:
        ids = row.tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        cut = next((j for j, t in enumerate(ids) if t in eos_ids), None)
        kept = ids if cut is None else ids[:cut]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        stopped = cut is not None
        for s in sampling.stop:  # generate stops *after* a stop string; the answer ends before it
            if s in text:
                text, stopped = text.split(s, 1)[0], True
        return make_completion(
            text,
            opened_think=self.spec.reasoning,
            finish_reason="stop" if stopped or len(kept) < sampling.max_tokens else "length",
            prompt_tokens=int(mask.sum()),
            completion_tokens=len(kept) + (1 if cut is not None else 0),
            latency_s=latency,
            model=lora_name or self.spec.name,
        )

    def _adapters(self, lora_name: str | None):
        """Base model (adapters disabled) when no adapter is asked for on a model that has some."""
        if self.spec.lora_adapters and lora_name is None:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

