"""`toushi data inspect RUN --stage sft|dpo`: see training examples the way the trainer sees them.

Each sample is rendered through the student's chat template, split the way TRL splits a conversational
prompt/completion (prompt rendered with the generation prompt; completion = the rest of the full
conversation), and printed with the tokens that carry loss highlighted. Warnings for the known traps:
a doubled BOS, a default system prompt the template injects into both prompt and completion (the Qwen
DPO pitfall when a completion is rendered on its own), a template that is not prefix-preserving, and
<think> reasoning that reached a target when the recipe did not ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from toushi.datasets import load_dpo, load_sft
from toushi.export import run_recipe
from toushi.models import resolve_model

MARK = "\x00TOUSHI_MARK\x00"


@dataclass
class Rendered:
    prompt_text: str
    completion_text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    warnings: list[str] = field(default_factory=list)


def default_system_prompt(tokenizer) -> str | None:
    """The system text the template inserts when a conversation has none (SmolLM2, Qwen2.5), or None."""
    bare = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False)
    with_sys = tokenizer.apply_chat_template(
        [{"role": "system", "content": MARK + "S"}, {"role": "user", "content": MARK}], tokenize=False
    )
    # Whatever the bare rendering has before the user turn, beyond the explicit-system rendering's own
    # scaffolding, is injected content; its longest line is the default system prompt.
    before_user = bare[: bare.index(MARK)]
    scaffold = with_sys[with_sys.index(MARK + "S") + len(MARK) + 1: with_sys.rindex(MARK)]
    injected = before_user[: len(before_user) - len(scaffold)] if before_user.endswith(scaffold) else before_user
    for special in tokenizer.all_special_tokens:
        injected = injected.replace(special, "\n")
    lines = [ln.strip() for ln in injected.splitlines() if ln.strip() and ln.strip() not in ("system",)]
    best = max(lines, key=len, default="")
    return best if len(best) >= 12 else None


def render(tokenizer, prompt: list[dict], completion: list[dict], keep_think: bool = False) -> Rendered:
    """Render one example like TRL does and collect what looks wrong with it."""
    warnings = []
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if full_text.startswith(prompt_text):
        completion_text = full_text[len(prompt_text):]
    else:
        warnings.append("chat template is not prefix-preserving: prompt rendering is not a prefix of the full one")
        completion_text = tokenizer.apply_chat_template(completion, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    if bos is not None and len(full_ids) > 1 and full_ids[0] == bos and full_ids[1] == bos:
        warnings.append(f"doubled BOS {tokenizer.bos_token!r} at the start of the sequence")
    # Only what training sees counts: TRL renders the completion as a continuation of the prompt, so a
    # template that injects its default system prompt (SmolLM2, Qwen2.5) puts it in the prompt once. It
    # lands in the completion too when the split falls back to rendering the completion on its own.
    default = default_system_prompt(tokenizer)
    if default and default in prompt_text and default in completion_text:
        warnings.append(
            f"default system prompt {default[:60]!r} appears in both the prompt and the completion: "
            "the completion should be rendered as a continuation of the prompt"
        )
    if not keep_think and "<think>" in completion_text:
        warnings.append("<think> reasoning in a training target (set keep_think to train on it on purpose)")
    return Rendered(prompt_text, completion_text, prompt_ids, completion_ids, warnings)


def loss_text(tokenizer, r: Rendered) -> Text:
    """Prompt tokens dim (no loss), completion tokens highlighted (loss), token boundaries visible."""
    t = Text()
    for i in r.prompt_ids:
        t.append(tokenizer.decode([i]), style="dim")
    for k, i in enumerate(r.completion_ids):
        t.append(tokenizer.decode([i]), style="bold green on grey15" if k % 2 else "bold green")
    return t


def inspect_run(run_dir: Path, stage: str, n: int = 3, console: Console | None = None) -> list[str]:
    """Print n rendered samples of the stage's training set; return the warnings found (deduplicated)."""
    from toushi.training import load_tokenizer

    console = console or Console()
    recipe = run_recipe(Path(run_dir))
    if recipe.models.student is None:
        raise ValueError(f"{run_dir}: recipe has no models.student")
    section = recipe.sft if stage == "sft" else recipe.dpo
    tokenizer = load_tokenizer(
        resolve_model(recipe.models.student.name), recipe.models.student.name, section.train.chat_template,
        f"{stage}.train",
    )
    if stage == "sft":
        examples, counts = load_sft(
            run_dir, target=recipe.sft.target, context_distillation=recipe.sft.context_distillation,
            keep_think=recipe.sft.keep_think, drop_markdown=recipe.sft.drop_markdown,
        )
        samples = [(e["id"], e["messages"][:-1], {"completion": e["messages"][-1:]}) for e in examples[:n]]
        keep_think = recipe.sft.keep_think
    elif stage == "dpo":
        examples, counts = load_dpo(run_dir, guided_pairs=recipe.dpo.guided_pairs, drop_markdown=recipe.dpo.drop_markdown)
        samples = [(e["id"], e["prompt"], {"chosen": e["chosen"], "rejected": e["rejected"]}) for e in examples[:n]]
        keep_think = False
    else:
        raise ValueError(f"--stage: expected sft or dpo, got {stage!r}")
    console.print(f"[bold]{stage}[/bold] set: {counts}")
    found: list[str] = []
    for sample_id, prompt, completions in samples:
        for name, completion in completions.items():
            r = render(tokenizer, prompt, completion, keep_think)
            console.rule(f"{sample_id} · {name} · loss on {len(r.completion_ids)} of "
                         f"{len(r.prompt_ids) + len(r.completion_ids)} tokens")
            console.print(loss_text(tokenizer, r))
            for w in r.warnings:
                console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
                if w not in found:
                    found.append(w)
    return found
