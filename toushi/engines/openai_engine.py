"""OpenAI-compatible engine: vLLM's server, DeepSeek's API, Ollama, llama.cpp.

An async client sends one chat request per (conversation, sample k) with at most ``spec.concurrency``
in flight per endpoint. 429s, 5xx, timeouts and connection errors are retried with exponential backoff
and full jitter; each request has ``spec.timeout_s``. When ``base_url`` lists several endpoints, requests
are spread over them and a failing one is taken out for a while, its requests sent elsewhere at once
(:mod:`toushi.engines.endpoints`); ``endpoint_stats()`` reports requests and errors per endpoint. A
structured request sends the constraint in the body (a JSON schema as ``response_format``, choices and
regexes as vLLM's ``structured_outputs``); an endpoint that refuses it (400/422, while the same request
without it goes through) gets plain requests from then on, and an answer that breaks the constraint is
asked for again (``STRUCTURED_RETRIES`` times, with the expected form spelled out) before it is returned
flagged. A conversation whose request still fails is reported to ``on_error(index, exc)`` and gets no
completions (or, without ``on_error``, the batch raises once every request has finished). The API key is
read from the environment variable the spec names and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable, Sequence

import openai

from toushi.engines import (
    Completion,
    Conversation,
    Engine,
    GenerationError,
    Structured,
    make_completion,
    mark_unstructured,
    per_conversation,
    per_conversation_lora,
    sample_seed,
    thinking_budget,
    top_logprobs,
)
from toushi.engines.endpoints import EndpointPool
from toushi.recipe import ModelSpec, Sampling
from toushi.think import CLOSE, OPEN, think_budget_hit

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STRUCTURED_RETRIES = 2


def api_key(spec: ModelSpec) -> str:
    if spec.api_key_env is None:
        return "EMPTY"  # local servers without auth still need a non-empty key in the client
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise GenerationError(f"model {spec.name}: environment variable {spec.api_key_env} (api_key_env) is not set")
    return key


def base_urls(spec: ModelSpec) -> list[str]:
    """The role's endpoints: ``base_url`` is one URL or a list of them."""
    return [spec.base_url] if isinstance(spec.base_url, str) else list(spec.base_url)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RETRYABLE):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


class OpenAIEngine(Engine):
    def __init__(self, spec: ModelSpec):
        if not spec.base_url:
            raise GenerationError(f"model {spec.name}: engine openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.spec = spec
        self.key = api_key(spec)
        self.retries_done = 0  # retries made so far (for tests and progress reports)
        # Kept for the engine's life, so an endpoint found dead in one batch stays out in the next.
        self.pool = EndpointPool(base_urls(spec), per_endpoint=spec.concurrency)
        # (endpoint, constraint kind) -> the endpoint's refusal of that kind, once seen: an endpoint that refuses a
        # JSON schema (response_format) may still take a regex or choices (vLLM's structured_outputs), and another
        # endpoint behind the same engine may take both
        self.structured_refused: dict[tuple[str, str], str] = {}
        self._think_ids: tuple[int, int] | None = None  # (<think>, </think>) ids, asked of a vLLM server once

    def endpoint_stats(self) -> dict[str, dict]:
        """Requests, successes and errors per endpoint so far, and the constraint kinds it refused (for the stage
        manifest)."""
        stats = self.pool.stats()
        for (url, kind), reason in self.structured_refused.items():
            stats[url].setdefault("constraints_refused", {})[kind] = reason
        return stats

    def generate(
        self,
        conversations: list[Conversation],
        sampling: Sampling,
        lora_name: str | None | Sequence[str | None] = None,
        structured: Structured | Sequence[Structured | None] | None = None,
        logprobs: int | None = None,
        on_error: Callable[[int, BaseException], None] | None = None,
    ) -> list[list[Completion]]:
        # A served LoRA adapter is addressed by its name as the model.
        self.check_lora(lora_name)
        base = self.spec.served_model or self.spec.name
        models = [name or base for name in per_conversation_lora(lora_name, len(conversations))]
        self._constraints = per_conversation(structured, len(conversations))
        self._logprobs = logprobs
        return asyncio.run(self._generate(conversations, sampling, models, on_error))

    async def _generate(self, conversations, sampling, models: list[str], on_error):
        clients = {
            u: openai.AsyncOpenAI(base_url=u, api_key=self.key, max_retries=0, timeout=self.spec.timeout_s)
            for u in self.pool.urls
        }
        sem = asyncio.Semaphore(self.pool.total_capacity)
        slots = asyncio.Condition()  # signalled whenever a request leaves an endpoint
        failures: dict[int, BaseException] = {}

        async def one(i: int, k: int) -> Completion | None:
            async with sem:
                try:
                    return await self._structured_request(clients, slots, conversations[i], sampling, k, models[i],
                                                          self._constraints[i])
                except Exception as e:  # noqa: BLE001 - reported per conversation below
                    failures.setdefault(i, e)
                    return None

        try:
            tasks = [[one(i, k) for k in range(sampling.n)] for i in range(len(conversations))]
            flat = await asyncio.gather(*(t for row in tasks for t in row))
        finally:
            for client in clients.values():
                await client.close()
        n = sampling.n
        results = [[c for c in flat[i * n : (i + 1) * n]] for i in range(len(conversations))]
        for i, exc in sorted(failures.items()):
            results[i] = []
            if on_error is not None:
                on_error(i, exc)
        if failures and on_error is None:
            i, exc = next(iter(sorted(failures.items())))
            raise GenerationError(
                f"model {models[i]} at {', '.join(self.pool.urls)}: {len(failures)} of {len(conversations)} "
                f"conversations failed; first (#{i}): {type(exc).__name__}: {exc}"
            ) from exc
        return results

    async def _structured_request(self, clients, slots, messages, sampling: Sampling, k: int, model: str,
                                  constraint: Structured | None) -> Completion:
        """One request; with a constraint, parse-and-retry until the answer satisfies it (or give up and
        return it flagged "unstructured")."""
        c = None
        for attempt in range(STRUCTURED_RETRIES + 1 if constraint is not None else 1):
            msgs = messages
            if attempt:  # spell out the expected form; a new seed so a greedy endpoint can answer otherwise
                msgs = [*messages, {"role": "assistant", "content": c.text},
                        {"role": "user", "content": expected_form(constraint, messages)}]
            c = await self._request(clients, slots, msgs, sampling, k + 1000 * attempt, model, constraint)
            if constraint is None or constraint.check(c.text):
                return c
        return mark_unstructured(c, constraint)

    def _body(self, constraint: Structured | None, url: str) -> dict:
        """The request fields that carry a constraint (none once this endpoint has refused its kind)."""
        if constraint is None or (url, constraint.kind) in self.structured_refused:
            return {}
        if constraint.json_schema is not None:
            return {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "answer", "schema": constraint.json_schema}}}
        key = "choice" if constraint.choices is not None else "regex"
        value = list(constraint.choices) if constraint.choices is not None else constraint.regex
        return {"extra_body": {"structured_outputs": {key: value}}}

    async def _request(self, clients, slots, messages, sampling: Sampling, k: int, model: str,
                       constraint: Structured | None = None) -> Completion:
        kwargs = dict(
            model=model,
            messages=messages,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            n=1,
        )
        seed = sample_seed(sampling, k)
        if seed is not None:
            kwargs["seed"] = seed
        if sampling.stop:
            kwargs["stop"] = sampling.stop
        if self._logprobs is not None:
            kwargs.update(logprobs=True, top_logprobs=self._logprobs)
        budget = thinking_budget(self.spec, sampling)
        if budget is not None:  # vLLM's server fields; token ids to tell whether the budget cut the reasoning
            kwargs["extra_body"] = {"thinking_token_budget": budget, "return_token_ids": True}
        attempt, failed_on = 0, set()  # failed_on: endpoints this request failed on since its last backoff
        while True:
            async with slots:
                while (ep := self.pool.choose(failed_on)) is None:
                    await slots.wait()
                self.pool.start(ep)
            t0 = time.perf_counter()
            body = self._body(constraint, ep.url)
            try:
                try:
                    extra = {**kwargs.get("extra_body", {}), **body.get("extra_body", {})}
                    resp = await clients[ep.url].chat.completions.create(
                        **{**kwargs, **body, "extra_body": extra or None})
                except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                    if not body:
                        raise
                    # the request without the constraint goes through (else its own error is raised): this
                    # endpoint does not take this kind of constraint, so plain text for it from now on, parsed
                    # and retried
                    resp = await clients[ep.url].chat.completions.create(**kwargs)
                    self.structured_refused[(ep.url, constraint.kind)] = f"{type(e).__name__}: {e}"[:300]
            except Exception as e:
                retryable = is_retryable(e)
                async with slots:
                    self.pool.failed(ep, e, take_out=retryable)
                    slots.notify_all()
                if not retryable:
                    raise
                failed_on.add(ep.url)
                if self.pool.other_up(failed_on):
                    continue  # fail over at once; the retry budget is for when no endpoint is left
                if attempt == self.spec.max_retries:
                    raise
                self.retries_done += 1
                # Full jitter: uniform in [0, base * 2^attempt], capped, so retrying clients spread out.
                await asyncio.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)))
                attempt, failed_on = attempt + 1, set()
                continue
            except BaseException:  # cancelled (Ctrl-C): give the slot back so the pool stays usable
                self.pool.abandoned(ep)
                raise
            async with slots:
                self.pool.succeeded(ep)
                slots.notify_all()
            break
        latency = time.perf_counter() - t0
        choice = resp.choices[0]
        msg = choice.message
        extra = msg.model_extra or {}
        # vLLM's reasoning parsers and DeepSeek's API return the think block separately.
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        usage = resp.usage
        hit = False
        if budget is not None and (ids := await self._think_token_ids(ep.url, model)) is not None:
            prompt_ids = (resp.model_extra or {}).get("prompt_token_ids") or []
            output_ids = (choice.model_extra or {}).get("token_ids") or []
            hit = think_budget_hit(prompt_ids, output_ids, *ids, budget)
        top = None
        if self._logprobs is not None and choice.logprobs is not None and choice.logprobs.content:
            top = [top_logprobs((t.token, t.logprob) for t in pos.top_logprobs) for pos in choice.logprobs.content]
        return make_completion(
            msg.content or "",
            reasoning=reasoning,
            opened_think=self.spec.reasoning,
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=latency,
            model=model,
            logprobs=top,
            budget_hit=hit,
        )

    async def _think_token_ids(self, url: str, model: str) -> tuple[int, int] | None:
        """The ids of ``<think>`` and ``</think>``, from a vLLM server's /tokenize (None elsewhere: no flag)."""
        if self._think_ids is None:
            import httpx

            try:
                async with httpx.AsyncClient(timeout=self.spec.timeout_s) as client:
                    r = await client.post(url.rstrip("/").removesuffix("/v1") + "/tokenize",
                                          headers={"Authorization": f"Bearer {self.key}"},
                                          json={"model": model, "prompt": OPEN + CLOSE, "add_special_tokens": False})
                tokens = r.json().get("tokens") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                tokens = None
            self._think_ids = tuple(tokens) if tokens and len(tokens) == 2 else (-1, -1)
        return None if self._think_ids == (-1, -1) else self._think_ids


def expected_form(constraint: Structured, messages: Conversation) -> str:
    """The follow-up message after an answer that broke its constraint (endpoints that cannot enforce it),
    in the language of the conversation's last message."""
    from toushi.metrics import detect_lang
    from toushi.templates import render

    lang = detect_lang(messages[-1]["content"]) or "en"
    schema = json.dumps(constraint.json_schema, ensure_ascii=False) if constraint.json_schema is not None else None
    return render("structured_retry", lang, choices=constraint.choices, regex=constraint.regex, schema=schema)
