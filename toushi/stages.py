"""The pipeline's stages, in their natural order, with what each reads.

A stage's ``sections`` are the recipe keys it reads, and the keys its fingerprint covers: the runner hands
the stage a view of the recipe that raises on any other key (toushi/recipe_view.py), so the two cannot drift.

Each stage's module is imported only when the stage runs, so ``toushi status`` or ``toushi recipe show``
do not pay for importing torch, vLLM or TRL.
"""

from __future__ import annotations

from toushi.recipe_view import RecipeView
from toushi.runner import Stage, StageContext


def _corpus(ctx: StageContext) -> dict:
    from toushi.corpus import run_stage

    return run_stage(ctx)


def _pairs(ctx: StageContext) -> dict:
    from toushi.pairs import run_stage

    return run_stage(ctx)


def _guidance(ctx: StageContext) -> dict:
    from toushi.guidance import run_stage

    return run_stage(ctx)


def _guided(ctx: StageContext) -> dict:
    from toushi.guided import run_stage

    return run_stage(ctx)


def _train(script: str):
    def run(ctx: StageContext) -> dict:
        from toushi.launch import run_training_stage

        return run_training_stage(ctx, script)

    return run


def _eval(ctx: StageContext) -> dict:
    from toushi.eval.evaluate import run_stage

    return run_stage(ctx)


def _report(ctx: StageContext) -> dict:
    from toushi.report import run_stage

    return run_stage(ctx)


# outputs: what a stage makes in its directory; what later stages read of it is part of their fingerprints,
# and a stage whose output is gone reruns
ADAPTER = ("adapter",)
STAGES: list[Stage] = [
    Stage("corpus", _corpus, ("run.lang", "run.seed", "corpus", "models.strong", "models.weak")),
    Stage("pairs", _pairs, ("run.lang", "pairs", "models.weak", "models.strong"), ("corpus",)),
    # the acceptance gate answers dev prompts with the weak role at the guided sampling and judges them as eval does
    Stage("guidance", _guidance, ("run.lang", "run.seed", "guidance", "models.strong", "models.weak", "models.judge",
                                  "guided.sampling", "eval.judge_mode", "eval.bootstrap"), ("pairs",), ("guidance.json",)),
    Stage("guided", _guided, ("run.lang", "guided", "pairs", "models.weak"), ("guidance", "pairs")),
    Stage("sft", _train("sft"), ("run.seed", "sft", "models.student"), ("pairs", "guided"), ADAPTER),
    Stage("dpo", _train("dpo"), ("run.seed", "dpo", "models.student"), ("pairs", "guided", "sft"), ADAPTER),
    Stage("grpo", _train("grpo"), ("run.seed", "grpo", "pairs", "models.student", "models.judge"),
          ("corpus", "guidance", "sft"), ADAPTER),
    # on-policy like grpo (the student samples, something scores), so it sits beside it; the guided teacher's
    # system prompt is built from the guidance and the pairs' strong answers, as the guided stage builds it
    Stage("distill", _train("distill"),
          ("run.seed", "run.lang", "distill", "guided.retrieved_examples", "models.student", "models.strong"),
          ("pairs", "guidance", "sft"), ADAPTER),
    # the judge roles matter only with selftrain.confidence: judge; in logprob mode a change redoes no round
    Stage("selftrain", _train("selftrain"), ("run.seed", "selftrain", "sft", "models.student", "models.judge", "models.strong"),
          ("pairs", "guided", "sft"), ADAPTER),
    # the tagger's label file names the emotions and needs on the simulated seeker's cards; in a multi-turn
    # conversation the weak, strong and guided systems answer at the sampling they answered with before
    Stage("eval", _eval, ("run.lang", "run.seed", "eval", "models", "corpus.tagging.labels_file",
                          "pairs.weak_sampling", "pairs.strong_sampling", "guided.sampling"),
          ("pairs", "guided", "sft", "dpo", "grpo", "distill", "selftrain"),
          ("records.jsonl", "summary.json")),
    Stage("report", _report, (), ("eval", "guidance"), ("index.html",)),
]
STAGE_NAMES = [s.name for s in STAGES]


def declared_view(recipe, name: str) -> RecipeView:
    """The recipe as stage ``name`` sees it when the runner runs it: only the keys it declares."""
    stage = next(s for s in STAGES if s.name == name)
    return RecipeView(recipe, stage.sections, name)
