"""Dress rehearsal: ``toushi run RECIPE --rehearse`` runs the recipe itself with each hub model replaced by its
twin (toushi.twins: the real tokenizer, template, vocabulary and architecture at toy size, random weights) and
every size scaled down, through the same stages, engines and launched train scripts, on a CPU in minutes.

There is no rehearsal copy of a recipe to drift: :func:`rehearse` is one transformation of the loaded Recipe,
and what it leaves alone is the recipe's own. The resolved rehearsal recipe is saved in the run directory like
every run's (``runs/<name>-rehearsal/recipe.yaml``), so what was rehearsed can be read back.

What a rehearsal proves and what it cannot (the README's GPU section says the same): the pipeline's plumbing
with the real tokenizers, ids, templates, vocabulary and embedding sizes, end and pad tokens, the reasoning split
and thinking budget, structured answers after ``</think>``, LoRA on the real architecture, and distillation
across the two real vocabularies. Not answer quality (the weights are random) and not real memory or speed (toy
width; ``width="real"`` builds the twins at their real width, for a GPU, to measure both models on one card).

Field by field, what is changed and why (every other field is the recipe's):

- ``run.name`` + ``-rehearsal``: a rehearsal never writes into (or skips stages of) the real run.
- ``models.*.name``: a hub model with a twin becomes its twin (``toushi models make-twin`` builds it once);
  any other model (a cached toushi model, a local directory) is kept. A hub model with no twin is an error.
- a role the recipe reaches over HTTP (``engine: openai``): at toy width its twin is served for the run by a
  local vLLM server (:func:`serve_openai_roles`, the same OpenAI-compatible path, ``reasoning_content`` and
  all), and the role's ``base_url`` points at it (``api_key_env`` and ``served_model`` dropped: the server is
  this machine's, without a key). The port is picked per run, so a rerun of such a rehearsal reruns the
  stages that read the role.
- vLLM roles, toy width: ``enforce_eager`` (CPU), ``dtype: auto`` (the twins are fp32; auto is bf16 where this
  CPU computes it natively), ``max_model_len`` at most CONTEXT and ``kv_cache_gb`` KV_CACHE_GB (the twins' KV
  cache is about 1 KB a token; an explicit size lets two engines stay loaded side by side on a CPU).
  At real width the engine settings are the recipe's.
- every ``sampling.max_tokens`` at most ANSWER_TOKENS (free text) or JSON_TOKENS (calls whose answer is parsed:
  tagging, guidance, the seeker; the judge sizes its own); ``thinking_budget`` at most THINKING_BUDGET. Random
  weights never close a think block, so every reasoning call rehearses the budget forcing ``</think>`` and the
  answer after it; a budget of 1 forces it at once (R1's prompt ends ``<think>\n``, which vLLM counts as the
  first token of reasoning), so R1's answers carry no reasoning of their own: random reasoning proves nothing
  more, and it keeps the stop below out of the think block.
- every sampling's ``top_p`` 1 at toy width: a random model's next-token distribution is nearly flat, so a
  nucleus keeps most of the vocabulary and rehearses nothing, while vLLM's CPU sampler sorts the whole vocabulary
  (152k for these twins) for every token of a batch in which any request has ``top_p`` below 1: with R1's 0.95
  that sort was 13 s of a rehearsal's 93 on one core (py-spy; 2-core AMD EPYC, AVX512-BF16 kind). What the
  rehearsal checks of sampling is kept: each engine is handed ``top_p`` where it is handed ``temperature``, and
  that is the recipe's. At real width ``top_p`` is the recipe's too.
- free-text answers that become targets or are compared (pairs, guided, eval's student answers) stop at STOP,
  the letter e: random weights never emit an end token, so without a stop every answer would be cut at
  max_tokens, and a cut answer is never a target (no SFT, DPO or guidance pair). Random tokens hold an e every
  few tokens and rarely start with one, so answers end within ANSWER_TOKENS and are seldom empty. Such an answer
  the recipe decodes greedily (eval's students: temperature 0) is sampled at GREEDY_TEMPERATURE instead: a random
  model's greedy answer repeats one token, which may hold no e, to max_tokens (every student answer of eval was
  cut so, on vLLM and the hf engine alike, and was judged as a cut answer). Role samplings get no stop: the judge
  reads its verdicts with them, and a stop would cut the JSON.
- corpus: at most POSTS posts (``per_scene`` 1, scene-balanced), HELDOUT_FRACTION of them held out (eval
  needs some); ``guidance``: batches and context to match, ``dev_prompts`` 1, at most SEED_DIMENSIONS seeded
  dimension (random weights fill every string of an analysis answer to its bound, and each seeded dimension
  adds rules, a longer answer and a worked-example call: one rehearses the path).
- training (sft, dpo, grpo, distill, selftrain): STEPS optimizer steps (REAL_STEPS at real width, so a step
  time is not only the first, warm-up step's) of BATCH examples, no accumulation,
  ``max_length`` at most TRAIN_LENGTH, a checkpoint at the last step; grpo NUM_GENERATIONS completions per
  prompt; completions at most ANSWER_TOKENS. On a CPU: ``bf16`` as the CPU allows (None) and no accelerate
  config (the GPU ones ask for CUDA; the script is still started by ``accelerate launch``). At real width the
  batch, length, precision and accelerate config are the recipe's, so memory is the real run's for these
  sequences (short: random answers stop early).
- selftrain: one round, SAMPLES answers on at most POSTS prompts; answers are kept whatever their log-prob
  (``tau`` TAU; a random model's mean log-prob is about -ln(vocabulary) = -12); they end at STOP like the
  pairs' answers (a random model never ends a turn, and a cut answer is never kept), so the round trains.
- eval: at most POSTS held-out prompts, BOOTSTRAP resamples, the simulated seeker on at most POSTS posts for
  one turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

from toushi.recipe import ModelSpec, Recipe, RecipeError, Sampling, TrainSpec, apply_overrides, walk

SUFFIX = "-rehearsal"
POSTS = 6  # with HELDOUT_FRACTION: 4 train posts and 2 held out from the shipped data
HELDOUT_FRACTION = 0.5
CONTEXT = 4096  # the longest rehearsal prompt (a guidance analysis) is under 1,000 tokens
KV_CACHE_GB = 0.25
ANSWER_TOKENS = 32
JSON_TOKENS = 256  # the longest constrained answer random weights write (strings at their bounds) is ~190 tokens
THINKING_BUDGET = 1
STOP = ["e"]
GREEDY_TEMPERATURE = 1.0  # what a greedy answer that must end at STOP samples at instead
STEPS = 1
REAL_STEPS = 3
BATCH = 2
TRAIN_LENGTH = 256
NUM_GENERATIONS = 2
SAMPLES = 2
TAU = -100.0
BOOTSTRAP = 20
SEED_DIMENSIONS = 1

Width = Literal["toy", "real"]


def rehearse(recipe: Recipe, width: Width = "toy", overrides: list[str] | None = None) -> Recipe:
    """The rehearsal of ``recipe`` (see the module's docstring, field by field); ``overrides`` (``--set``) are
    applied again last, so a key given on the command line wins over the rehearsal's value."""
    r = recipe.model_copy(deep=True)
    toy = width == "toy"
    r.run.name = recipe.run.name + SUFFIX
    for role in ("weak", "strong", "student", "judge"):
        spec = getattr(r.models, role)
        if spec is not None:
            setattr(r.models, role, _model(spec, role, width))

    c = r.corpus
    c.per_scene, c.max_posts = 1, min(c.max_posts or POSTS, POSTS)
    c.heldout_fraction = max(c.heldout_fraction, HELDOUT_FRACTION)
    for sub in (c.rewrite, c.personas, c.tagging):
        sub.sampling = _tokens(sub.sampling, JSON_TOKENS if sub is c.tagging else ANSWER_TOKENS)
    c.personas.per_scene = 1

    weak, strong = r.models.weak, r.models.strong
    r.pairs.batch_size = min(r.pairs.batch_size, POSTS)
    if weak is not None:
        r.pairs.weak_sampling = _stop(r.pairs.weak_sampling or weak.sampling)
        r.guided.sampling = _stop(r.guided.sampling or weak.sampling)
    if strong is not None:
        r.pairs.strong_sampling = _stop(r.pairs.strong_sampling or strong.sampling)

    g = r.guidance
    g.batch_size, g.dev_prompts = min(g.batch_size, POSTS), 1
    g.seed_dimensions = min(g.seed_dimensions, SEED_DIMENSIONS)
    g.context_tokens = min(g.context_tokens or CONTEXT, CONTEXT) if toy else g.context_tokens
    g.max_pairs = min(g.max_pairs or POSTS, POSTS)
    g.sampling = _tokens(g.sampling, JSON_TOKENS)

    for section in (r.sft, r.dpo, r.grpo, r.distill, r.selftrain):
        section.train = _train(section.train, toy)
    r.grpo.num_generations = NUM_GENERATIONS
    if toy:
        r.grpo.train.per_device_train_batch_size = NUM_GENERATIONS  # one prompt's group a step
    r.grpo.max_completion_length = min(r.grpo.max_completion_length, ANSWER_TOKENS)
    r.distill.max_completion_length = min(r.distill.max_completion_length, ANSWER_TOKENS)
    s = r.selftrain
    s.rounds, s.samples_per_prompt, s.max_prompts = 1, SAMPLES, min(s.max_prompts or POSTS, POSTS)
    s.max_new_tokens, s.tau, s.judge_tau, s.stop = min(s.max_new_tokens, ANSWER_TOKENS), TAU, -1.0, STOP

    e = r.eval
    e.max_prompts, e.bootstrap = min(e.max_prompts or POSTS, POSTS), BOOTSTRAP
    e.batch_size = min(e.batch_size, POSTS)
    e.sampling = _stop(e.sampling)
    if e.judge_sampling is not None:
        e.judge_sampling = _tokens(e.judge_sampling, JSON_TOKENS)
    e.simulate.max_posts, e.simulate.turns = min(e.simulate.max_posts or POSTS, POSTS), 1
    e.simulate.sampling = _tokens(e.simulate.sampling, JSON_TOKENS)
    e.simulate.reply_sampling = _tokens(e.simulate.reply_sampling, ANSWER_TOKENS)
    if toy:
        for _, owner, field, value in list(walk(r)):
            if isinstance(value, Sampling):
                setattr(owner, field, value.model_copy(update={"top_p": 1.0}))
    if not overrides:
        return r
    return _validated(apply_overrides(r.model_dump(mode="json"), overrides))


def _model(spec: ModelSpec, role: str, width: Width) -> ModelSpec:
    from pathlib import Path

    from toushi.models import resolve_model
    from toushi.twins import TWINS, make_twin, twin_of

    update: dict = {"sampling": _tokens(spec.sampling, ANSWER_TOKENS)}
    twin = twin_of(spec.name)
    if twin is not None:
        make_twin(twin.name, real_width=width == "real")
        update["name"] = twin.cached_name_at(width == "real")
    elif resolve_model(spec.name) == spec.name and not Path(spec.name).expanduser().exists():  # a hub id
        raise RecipeError(f"models.{role}.name: {spec.name} has no twin to rehearse with (twins: "
                          f"{', '.join(t.hub_id for t in TWINS.values())}) and is not a local model")
    if spec.thinking_budget is not None:
        update["thinking_budget"] = min(spec.thinking_budget, THINKING_BUDGET)
    if spec.engine in ("vllm", "openai") and width == "toy":  # an openai role's twin is served by vLLM here
        update.update(enforce_eager=True, dtype="auto", max_model_len=min(spec.max_model_len or CONTEXT, CONTEXT),
                      kv_cache_gb=KV_CACHE_GB)
    return spec.model_copy(update=update)


ROLES = ("weak", "strong", "student", "judge")


@contextmanager
def serve_openai_roles(recipe: Recipe, log_dir: Path) -> Iterator[Recipe]:
    """The rehearsal with each ``engine: openai`` role's twin served by a local vLLM server for as long as the
    block runs (one server per model, shared by its roles); the recipe is the same one with every such role's
    ``base_url`` pointing at its server. A recipe without such roles comes back as it is."""
    import socket

    from toushi.engines.server import VLLMServer

    served = {role: spec for role in ROLES if (spec := getattr(recipe.models, role)) and spec.engine == "openai"}
    if not served:
        yield recipe
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    r = recipe.model_copy(deep=True)
    with ExitStack() as stack:
        servers: dict[str, VLLMServer] = {}
        for role, spec in served.items():
            if spec.name not in servers:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                local = spec.model_copy(update={"engine": "vllm", "base_url": None, "served_model": None,
                                                "api_key_env": None})
                servers[spec.name] = VLLMServer(local, port=port, log_path=log_dir / f"server-{role}.log").launch()
                stack.callback(servers[spec.name].stop)
        for role, spec in served.items():
            servers[spec.name].wait_healthy()  # the servers start side by side
            setattr(r.models, role, spec.model_copy(update={"base_url": servers[spec.name].base_url,
                                                            "served_model": None, "api_key_env": None}))
        yield r


def _tokens(sampling: Sampling, most: int) -> Sampling:
    return sampling.model_copy(update={"max_tokens": min(sampling.max_tokens, most)})


def _stop(sampling: Sampling) -> Sampling:
    return sampling.model_copy(update={"max_tokens": min(sampling.max_tokens, ANSWER_TOKENS),
                                       "stop": sorted({*sampling.stop, *STOP}),
                                       "temperature": sampling.temperature or GREEDY_TEMPERATURE})


def _train(train: TrainSpec, toy: bool) -> TrainSpec:
    steps = STEPS if toy else REAL_STEPS
    update: dict = dict(max_steps=steps, save_steps=steps, logging_steps=1, gradient_accumulation_steps=1,
                        eval_fraction=0.0)
    if toy:
        update.update(per_device_train_batch_size=min(train.per_device_train_batch_size, BATCH),
                      max_length=min(train.max_length, TRAIN_LENGTH), bf16=None, accelerate_config=None)
    return train.model_copy(update=update)


def _validated(data: dict) -> Recipe:
    from pydantic import ValidationError

    from toushi.recipe import _format_errors

    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, "--rehearse --set")) from None
