"""The one path for the model calls a stage makes: cached by content, resumable, batched, with progress.

A call is (kind, conversation, model, adapter, sampling, constraint, sample index). Its key hashes all of them:
the model as :func:`toushi.engines.cache_model` names it (served name, dtype, a local directory's weights digest,
thinking budget) and an adapter by its content digest, so a changed input asks again and a renamed one does not.
Each call's raw completion is appended to a JSONL store as soon as its batch returns (flushed per batch), so a
killed run repeats no finished call. Callers parse on read: a parser fixed later applies to calls already made.
The engine is opened only when some call is missing. With ``valid`` (a check on a completion), an output that
fails it is asked once more (attempt 1, the sampling seed moved on); both records stay, the retry is used.

A key is a content hash and nothing else, so no record ever goes stale: a record whose inputs changed is simply
never asked for again (the one stale-record rule). Stages that keep their own per-prompt output (pairs, guided)
decide from these keys whether that output is current.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toushi.engines import Completion, Structured
from toushi.recipe import Sampling
from toushi.store import StageStore, stable_id


@dataclass
class CallStats:
    new: int = 0  # calls made by this object (retries included)
    cached: int = 0  # calls answered from the store
    retried: int = 0  # outputs that failed ``valid`` and were asked once more


class Calls:
    """Model calls of one kind, one model and one sampling, cached in ``store``.

    ``model`` is the model's cache identity (``engines.cache_model(spec)``); ``open_engine()`` gives the engine
    (the run's shared one, or one this object closes in :meth:`close`); ``adapters`` maps LoRA names to their
    content digests (``engines.adapters.adapter_fingerprint``), so a retrained adapter of the same name is asked
    anew; ``logprobs`` asks the engine for each token's top-k log-probabilities (a call that keeps them is
    another call).
    """

    def __init__(self, store: StageStore, model: str, open_engine: Callable[[], object], sampling: Sampling, *,
                 kind: str, adapters: Mapping[str, str] | None = None, batch_size: int = 8,
                 console: Console | None = None, label: str | None = None, logprobs: int | None = None):
        self.store, self.model, self.open_engine, self.kind = store, model, open_engine, kind
        self.logprobs = logprobs  # top-k logprobs per generated token, stored with the completion
        self.sampling = sampling
        self.adapters = dict(adapters or {})
        self.batch_size = max(1, batch_size)
        self.console, self.label = console, label or kind
        self.stats = CallStats()
        self._engine = None
        self._records: dict[str, dict] | None = None

    # ------------------------------------------------------------------ keys

    def key(self, conversation: list[dict], *, structured: Structured | None = None, lora: str | None = None,
            k: int = 0, attempt: int = 0) -> str:
        if lora is not None and lora not in self.adapters:
            raise ValueError(f"{self.kind}: no content digest for adapter {lora!r}")
        return stable_id("call", self.kind, conversation, self.model, self.adapters.get(lora) if lora else None,
                         self.sampling.model_dump(mode="json", exclude={"n"}),
                         structured.key() if structured is not None else None, k, attempt, self.logprobs)

    # ------------------------------------------------------------------ calls

    def records(self) -> dict[str, dict]:
        """Every call in the store, by key (read once; this object appends what it makes)."""
        if self._records is None:
            self._records = {r["id"]: r for r in self.store.records()}
        return self._records

    def generate(self, conversations: Sequence[list[dict]], *,
                 structured: Structured | None | Sequence[Structured | None] = None,
                 lora: str | None | Sequence[str | None] = None, meta: Sequence[dict] | None = None,
                 valid: Callable[[Completion], bool] | None = None,
                 on_error: Callable[[int, BaseException], None] | None = None) -> list[list[Completion]]:
        """``sampling.n`` completions per conversation, from the store where it has them. ``structured`` and
        ``lora`` apply to all conversations or, as lists, one each; ``meta`` (one dict each) is written into
        the records (a step name, a prompt id) for people reading them. ``on_error(i, exc)`` (an endpoint
        engine's per-request failures, i indexing ``conversations``): that conversation gets no completions
        and nothing is stored for it, so a rerun asks again."""
        n = len(conversations)
        structured = _each(structured, n)
        lora = _each(lora, n)
        meta = list(meta) if meta is not None else [{}] * n
        samples = self.sampling.n
        keys = [[self.key(c, structured=s, lora=a, k=k) for k in range(samples)]
                for c, s, a in zip(conversations, structured, lora)]
        failed = self._fill(conversations, keys, structured, lora, meta, self.sampling, attempt=0, on_error=on_error)
        out = [[] if i in failed else [Completion.from_dict(self.records()[k]["completion"]) for k in ks]
               for i, ks in enumerate(keys)]
        if valid is None:
            return out

        bad = [(i, k) for i in range(n) if i not in failed for k in range(samples) if not valid(out[i][k])]
        if bad:  # one more try each, with the seed moved on so a sampled model can answer otherwise
            seed = (self.sampling.seed or 0) + 1
            again = self.sampling.model_copy(update={"n": 1, "seed": seed})
            rkeys = [[self.key(conversations[i], structured=structured[i], lora=lora[i], k=k, attempt=1)]
                     for i, k in bad]
            self._fill([conversations[i] for i, _ in bad], rkeys, [structured[i] for i, _ in bad],
                       [lora[i] for i, _ in bad], [meta[i] for i, _ in bad], again, attempt=1)
            self.stats.retried += len(bad)
            for (i, k), (rk,) in zip(bad, rkeys):
                out[i][k] = Completion.from_dict(self.records()[rk]["completion"])
        return out

    def texts(self, conversations: Sequence[list[dict]], **kw) -> list[str]:
        """The first completion's text per conversation (for calls without ``on_error``, where every call has
        one)."""
        return [c[0].text for c in self.generate(conversations, **kw)]

    @property
    def engine(self):
        """The engine, once a call has opened it (endpoint statistics, a tokenizer), else None."""
        return self._engine

    def _fill(self, conversations, keys, structured, lora, meta, sampling: Sampling, attempt: int,
              on_error=None) -> set[int]:
        """Generate the conversations some of whose keys are not stored yet, in batches, each batch flushed.
        Returns the indices that failed (reported to ``on_error``)."""
        have = self.records()
        todo, seen = [], set()
        for i, ks in enumerate(keys):
            if all(k in have for k in ks) or ks[0] in seen:  # the same call twice in one request is made once
                self.stats.cached += 1
            else:
                seen.add(ks[0])
                todo.append(i)
        failed: set[int] = set()
        if not todo:
            return failed
        if self._engine is None:
            self._engine = self.open_engine()
        columns = (TextColumn(f"[bold]{self.label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[tps]:.1f} out tok/s"), TimeElapsedColumn())
        t0, out_tokens = time.perf_counter(), 0
        with self.store.writer(batch_size=len(todo)) as w, Progress(*columns, console=self.console,
                                                                    transient=True) as bar:
            task = bar.add_task(self.label, total=len(todo), tps=0.0)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                # what a call does not use stays at the engine's default (one setting for the whole batch);
                # on_error is the endpoint engine's alone
                kw = {}
                if self.logprobs is not None:
                    kw["logprobs"] = self.logprobs
                if on_error is not None:
                    def failure(j: int, exc: BaseException, chunk=chunk) -> None:
                        failed.add(chunk[j])
                        on_error(chunk[j], exc)

                    kw["on_error"] = failure
                if any(structured[i] is not None for i in chunk):
                    kw["structured"] = [structured[i] for i in chunk]
                if any(lora[i] is not None for i in chunk):
                    kw["lora_name"] = [lora[i] for i in chunk]
                outs = self._engine.generate([conversations[i] for i in chunk], sampling, **kw)
                for i, comps in zip(chunk, outs, strict=True):
                    for k, c in zip(keys[i], comps):
                        if k in have:  # a sample stored before, when only some of the n were
                            continue
                        rec = {"id": k, "kind": self.kind, "model": self.model, "lora": lora[i], "attempt": attempt,
                               **meta[i], "conversation": conversations[i], "completion": c.to_dict()}
                        w.write(rec)
                        have[k] = rec
                        out_tokens += c.completion_tokens
                w.flush()
                self.stats.new += len(chunk)
                bar.update(task, advance=len(chunk), tps=out_tokens / max(1e-9, time.perf_counter() - t0))
        return failed

    def close(self) -> None:
        """Close the engine if this object opened one (a view of the run's shared engine frees nothing)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def once(open_engine: Callable[[], object]) -> Callable[[], object]:
    """An opener that opens the engine at its first use and then gives that one: for several Calls (kinds, samplings)
    on one engine, which none of them opens unless a call is not cached."""
    opened: list = []

    def get():
        if not opened:
            opened.append(open_engine())
        return opened[0]

    return get


def _each(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{len(value)} values for {n} conversations")
        return list(value)
    return [value] * n
