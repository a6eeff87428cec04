"""``toushi`` command line. Each command parses its arguments and calls one library function."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="toushi (偷师): distil a strong model's emotional-support skill into a small student.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Offline model cache.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipes.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(recipe_app, name="recipe")

out = Console()
err = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key.sub=value.")]


def _fail(msg: str) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False)  # a message may quote "[...]" from data
    raise typer.Exit(2)


def load(recipe: Path, overrides: list[str] | None):
    """The recipe as `toushi run` uses it: YAML, then the run's overrides.yaml (said aloud), then --set."""
    from toushi.recipe import RUN_OVERRIDES, RecipeError, load_recipe, run_overrides

    try:
        r = load_recipe(recipe, overrides or [], with_run_overrides=True)
        saved = run_overrides(r.run_dir)
    except RecipeError as e:
        _fail(str(e))
    if saved:
        err.print(f"[yellow]run overrides[/yellow] from {r.run_dir / RUN_OVERRIDES} (--set wins): "
                  + ", ".join(f"{k}={v}" for k, v in saved.items()), highlight=False)
    return r


def run_path(run: str) -> Path:
    """A run given as a directory or as a name under ./runs."""
    p = Path(run)
    if p.is_dir():
        return p
    if (Path("runs") / run).is_dir():
        return Path("runs") / run
    _fail(f"no run directory {run!r} (looked in . and ./runs)")


# ----------------------------------------------------------------------------------- pipeline


@app.command()
def run(
    recipe: Path,
    set_: SetOpt = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Rerun this stage and every stage downstream of it.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show engine and library output (default: each stage's engine.log).")
    ] = False,
    rehearse: Annotated[
        bool, typer.Option("--rehearse", help="Dress rehearsal: the recipe on its hub models' twins, every size "
                           "scaled down (toushi/rehearse.py), in runs/<name>-rehearsal; `toushi check` first.")
    ] = False,
    rehearse_width: Annotated[
        str, typer.Option(help="With --rehearse: twins at toy width (CPU) or at the hub models' real width (a GPU: "
                          "memory and step times).")
    ] = "toy",
    ignore_plan: Annotated[
        bool, typer.Option("--ignore-plan", help="On a GPU, run even what `toushi plan` says does not fit the card "
                           "(its estimates hold every row full: an upper bound for unpacked batches).")
    ] = False,
):
    """Run the recipe's stages in order (finished, unchanged stages are skipped)."""
    from contextlib import nullcontext

    from toushi.errors import ToushiError
    from toushi.rehearse import serve_openai_roles
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    r = load(recipe, set_)
    if rehearse:
        r = rehearsal(r, rehearse_width, set_)
    if not ignore_plan:
        refuse_what_cannot_fit(r)
    try:
        # a rehearsal serves the twin of a role the recipe reaches over HTTP, for the run
        with serve_openai_roles(r, r.run_dir / "servers") if rehearse else nullcontext(r) as r:
            err.print(f"[bold]recipe[/bold] {recipe} → {r.run_dir}")
            err.print(r.to_yaml(), markup=False, highlight=False)
            run_stages(r, STAGES, set(force or []), quiet=not verbose)
    except (ToushiError, ValueError, OSError) as e:  # a stage's own error (PairsIncomplete, TrainingFailed, ...)
        _fail(str(e))
    out.print(f"run complete: {r.run_dir}")


def refuse_what_cannot_fit(r) -> None:
    """On a CUDA machine, before the first stage: what `toushi plan` says cannot fit this card is refused now,
    not hours later when that stage runs out of memory. A CPU run is not checked (its card is the RAM, and
    its models are small); a shape the plan cannot read is said and left to the run."""
    from toushi import hardware
    from toushi import plan as planner

    if not hardware.cuda_possible():
        return
    card, on_gpu, what = planner.card_memory()
    if not on_gpu:
        return
    try:
        _, problems = planner.plan(r, card, on_gpu)
    except planner.PlanError as e:
        err.print(f"[yellow]memory plan skipped:[/yellow] {e}", highlight=False)
        return
    for p in problems:
        err.print(f"[red]does not fit:[/red] {p}", highlight=False)
    if problems:
        _fail(f"{what} ({card / planner.GIB:.0f} GiB) cannot hold the above by `toushi plan`'s arithmetic: change the "
              "recipe (smaller batches, qlora or gradient_checkpointing auto, largest_micro_batch), or pass "
              "--ignore-plan")


def rehearsal(r, width: str, overrides: list[str] | None):
    """The rehearsal of a loaded recipe (--set applied again over it), after its pre-flight check passed."""
    from toushi.models import ModelError
    from toushi.recipe import RecipeError
    from toushi.rehearse import rehearse

    if width not in ("toy", "real"):
        _fail(f"--rehearse-width {width!r}: toy or real")
    try:
        r = rehearse(r, width, overrides)
    except (RecipeError, ModelError) as e:
        _fail(str(e))
    err.print(f"[bold]rehearsal[/bold] on the models' twins ({width} width), every size scaled down; pre-flight:")
    if not preflight(r):
        _fail("pre-flight: a model pair cannot work (above); the real run would fail the same way")
    return r


@app.command()
def check(recipe: Path, set_: SetOpt = None):
    """Pre-flight: every model pair of the recipe that must agree token for token, and what toushi does about
    each difference (exit 2 when a pair cannot work)."""
    if not preflight(load(recipe, set_)):
        raise typer.Exit(2)


@app.command()
def plan(recipe: Path, set_: SetOpt = None,
         card_gib: Annotated[float | None, typer.Option(help="The target card's memory in GiB (default: the "
                                                         "CUDA device here, else this machine's RAM).")] = None):
    """The memory each training stage and each vLLM engine of a recipe needs on its card, by arithmetic from the
    models' shapes (toushi/plan.py); exit 2 when something cannot fit."""
    from toushi.plan import GIB, PlanError, card_memory
    from toushi.plan import plan as make_plan

    r = load(recipe, set_)
    if card_gib is not None:
        card, on_gpu, what = card_gib * GIB, True, f"a {card_gib:g} GiB card"
    else:
        card, on_gpu, what = card_memory()
    try:
        items, problems = make_plan(r, card, on_gpu)
    except PlanError as e:
        _fail(str(e))
    columns = sorted({k for it in items for k in it.parts}, key=lambda k: [
        "weights", "dequantised", "kv cache", "adapter+adamw", "activations", "logits", "teacher", "colocated vLLM"].index(k))
    table = Table(title=f"{recipe}: memory on {what} ({card / GIB:.0f} GiB), GiB")
    table.add_column("", no_wrap=True)
    for c in [*columns, "total"]:
        table.add_column(c, justify="right")
    table.add_column("notes", overflow="fold")
    for it in items:
        table.add_row(it.name, *(f"{it.parts[c] / GIB:.1f}" if c in it.parts else "" for c in columns),
                      f"{it.total / GIB:.1f}", "; ".join(it.notes))
    out.print(table)
    for p in problems:
        err.print(f"[red]does not fit:[/red] {p}", highlight=False)
    if problems:
        raise typer.Exit(2)


def preflight(r) -> bool:
    """Print the pre-flight check of a recipe's model pairs; whether every pair can work."""
    from toushi.models import ModelError
    from toushi.preflight import check_recipe

    try:
        pairs = check_recipe(r)
    except (ModelError, OSError, ValueError) as e:
        _fail(f"pre-flight: cannot read a model's config or tokenizer: {e}")
    if not pairs:
        out.print("no model pairs to check (no distill with teacher: strong, no trained adapters yet)")
    for pair in pairs:
        table = Table("", pair.a.role, pair.b.role, title=pair.what, title_justify="left")
        for label, key in [("model", "name"), ("embedding rows", "rows"), ("tokenizer tokens", "tokens"),
                           ("end ids", "end"), ("pad id", "pad"), ("template round-trip", "round_trip")]:
            values = [getattr(side, key) for side in (pair.a, pair.b)]
            table.add_row(label, *(", ".join(v) if isinstance(v, list) else str(v) for v in values))
        out.print(table)
        differ = pair.special_differ
        out.print(f"special tokens that differ by id: {len(differ)}" + (f" ({'; '.join(differ[:8])}"
                  f"{'; ...' if len(differ) > 8 else ''})" if differ else ""), markup=False, highlight=False)
        for action in pair.actions:
            out.print(f"toushi will: {action}", markup=False, highlight=False)
        if pair.refused:
            out.print(f"toushi refuses: {pair.refused}", markup=False, highlight=False)
    return all(p.ok for p in pairs)


@app.command()
def status(run: str):
    """Print each stage's state and counts for a run."""
    from toushi.runner import stage_status
    from toushi.stages import STAGE_NAMES

    rd = run_path(run)
    table = Table("stage", "status", "counts", "wall s")
    for row in stage_status(rd, STAGE_NAMES):
        colour = {"complete": "green", "failed": "red", "running": "yellow"}.get(row["status"], "dim")
        counts = ", ".join(f"{k}={v}" for k, v in row["counts"].items() if not isinstance(v, dict))
        table.add_row(row["stage"], f"[{colour}]{row['status']}[/{colour}]", counts, str(row["wall_s"] or ""))
    out.print(table)


@recipe_app.command("show")
def recipe_show(recipe: Path, set_: SetOpt = None):
    """Print the resolved recipe (defaults + YAML + --set)."""
    out.print(load(recipe, set_).to_yaml(), markup=False, highlight=False)


# ----------------------------------------------------------------------------------- models


@models_app.command("fetch")
def models_fetch(name: str, force: bool = False):
    """Download and convert an offline model into the cache (instant when cached)."""
    from toushi.models import ModelError, fetch

    try:
        path = fetch(name, force=force)
    except ModelError as e:
        _fail(str(e))
    out.print(str(path))


@models_app.command("make-tiny")
def models_make_tiny(force: bool = False):
    """Write a random-weight 2-layer model with SmolLM2's tokenizer (for fast tests)."""
    from toushi.models import ModelError, make_tiny

    try:
        out.print(str(make_tiny(force=force)))
    except ModelError as e:
        _fail(str(e))


@models_app.command("make-twin")
def models_make_twin(
    name: Annotated[str, typer.Argument(help="qwen2.5-1.5b-instruct, r1-distill-qwen-7b or r1-distill-qwen-1.5b")],
    force: bool = False,
    real_width: Annotated[bool, typer.Option(help="At the hub model's real width and depth (bf16, for a GPU; "
                                                  "cached as <name>-twin-real-width).")] = False,
):
    """Write a hub model's twin: its real tokenizer, template, vocabulary and architecture, at toy size with
    random weights."""
    from toushi.models import ModelError
    from toushi.twins import make_twin

    try:
        out.print(str(make_twin(name, force=force, real_width=real_width)))
    except ModelError as e:
        _fail(str(e))


@models_app.command("list")
def models_list():
    """Show cached models."""
    from toushi.models import ModelError, list_cached

    try:
        rows = list_cached()
    except ModelError as e:
        _fail(str(e))
    table = Table("name", "size MB", "source", "path")
    for r in rows:
        table.add_row(r["name"], str(r["size_mb"]), r.get("source", ""), r["path"])
    out.print(table)


@app.command()
def report(
    run: str,
    open_: Annotated[bool, typer.Option("--open", help="Also open the report in a web browser.")] = False,
):
    """Build (or rebuild) a run's HTML + Markdown report from what is on disk and print its path."""
    from toushi.report import ReportError, build_report

    try:
        index = build_report(run_path(run))
    except ReportError as e:
        _fail(str(e))
    out.print(str(index.resolve()), soft_wrap=True, highlight=False)  # one unwrapped line, for scripts
    if open_:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())


@app.command()
def review(
    run: str,
    host: Annotated[
        str, typer.Option(help="Bind address (loopback; anything else needs --allow-remote).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (the page can edit the run).")
    ] = False,
):
    """Serve a local page to read a run's answers side by side and accept, edit, delete or add guidance rules.

    Each change is saved as runs/<run>/review/guidance.vNNN.md and set as the run's guidance.edited_file
    (runs/<run>/overrides.yaml), so the next `toushi run` of the recipe reruns guidance and what follows.
    """
    from toushi.review import ReviewError, serve

    try:
        serve(run_path(run), host=host, port=port, allow_remote=allow_remote)
    except (ReviewError, OSError) as e:
        _fail(str(e))


# ----------------------------------------------------------------------------------- corpus

corpus_app = typer.Typer(help="The venting corpus.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("tag")
def corpus_tag(
    file: Path,
    recipe: Annotated[Path, typer.Option(help="Recipe naming the tagging model (models.<role>) and its settings "
                                              "(corpus.tagging).")],
    role: Annotated[str | None, typer.Option(help="weak, strong or judge (default: corpus.tagging.role).")] = None,
    lang: Annotated[str | None, typer.Option(help="zh or en: the label set and prompt (default: corpus.lang, "
                                                  "else run.lang).")] = None,
    field: Annotated[str | None, typer.Option(help="Field holding the post (default: text, post, prompt or "
                                                   "situation, the first present).")] = None,
    gold: Annotated[str | None, typer.Option(help="Field with known emotion labels to measure the tagger against "
                                                  "(default: emotion or emotion_type, when present).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Output JSONL (default: <file stem>.tagged.jsonl "
                                                                "in the current directory).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Tag only the first N records.")] = None,
    set_: SetOpt = None,
):
    """Tag each post of a prompt file (JSONL, JSON, CSV or a datasets dir) with an emotion and an intent."""
    from toushi.corpus.tagging import TaggingError, agreement_markdown, tag_file
    from toushi.engines import GenerationError, cache_model, make_engine

    r = load(recipe, set_)
    role = role or r.corpus.tagging.role
    if role not in ("weak", "strong", "judge"):
        _fail(f"--role {role}: expected weak, strong or judge")
    spec = getattr(r.models, role)
    if spec is None:
        _fail(f"{recipe}: models.{role} is not set")
    lang = lang or r.corpus.lang or r.run.lang
    if lang not in ("zh", "en"):
        _fail(f"--lang {lang}: expected zh or en")
    out_path = out_file or Path(f"{file.stem}.tagged.jsonl")
    engines: list = []

    def get_engine():
        if not engines:
            err.print(f"tagging with {spec.name} ({spec.engine})", highlight=False)
            engines.append(make_engine(spec))
        return engines[0]

    tg = r.corpus.tagging
    try:
        res = tag_file(file, out_path, lang=lang, get_engine=get_engine, model=cache_model(spec),
                       sampling=tg.sampling, field=field, gold_field=gold, limit=limit, template=tg.template,
                       labels_file=tg.labels_file)
    except (TaggingError, GenerationError, OSError) as e:
        _fail(str(e))
    finally:
        for engine in engines:
            engine.close()
    err.print(f"{res['records']} records ({res['text_field']!r} tagged), {res['generated']} generated, "
              f"{res['invalid']} with an unusable answer", highlight=False)
    if res["agreement"]:
        err.print(agreement_markdown(res["agreement"], f"tagger vs {res['gold_field']!r}"), markup=False,
                  highlight=False)
    out.print(str(out_path), soft_wrap=True, highlight=False)


# ----------------------------------------------------------------------------------- guidance

guidance_app = typer.Typer(help="The guidance a run extracted.", no_args_is_help=True)
app.add_typer(guidance_app, name="guidance")


@guidance_app.command("show")
def guidance_show(
    run: str,
    system_prompt: Annotated[
        bool, typer.Option("--system-prompt", help="Print the system prompt the weak model gets instead.")
    ] = False,
):
    """Print a run's guidance (guidance.md), or the system prompt made from it."""
    from toushi.guidance import load_guidance

    d = run_path(run) / "guidance"
    if not (d / "guidance.md").is_file():
        _fail(f"no guidance in {d} (run the guidance stage first)")
    if system_prompt:
        typer.echo(load_guidance(d))  # raw text, unwrapped: meant to be piped into a file
        return
    from rich.markdown import Markdown

    out.print(Markdown((d / "guidance.md").read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------------- data / export

data_app = typer.Typer(help="Training data.", no_args_is_help=True)
export_app = typer.Typer(help="Export students and training sets for other tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")


@data_app.command("inspect")
def data_inspect(
    run: str,
    stage: Annotated[str, typer.Option(help="sft or dpo.")] = "sft",
    n: Annotated[int, typer.Option(help="Samples to show.")] = 3,
):
    """Render training samples through the student's chat template; highlight the tokens with loss."""
    from toushi.datasets import DatasetError
    from toushi.export import ExportError
    from toushi.inspect_data import inspect_run
    from toushi.models import ModelError
    from toushi.training import TrainError

    try:
        warnings = inspect_run(run_path(run), stage, n, out)
    except (DatasetError, ExportError, ModelError, TrainError, ValueError) as e:
        _fail(str(e))
    err.print(f"{len(warnings)} warning(s)" if warnings else "[green]no warnings[/green]")


PushOpt = Annotated[str | None, typer.Option("--push-to-hub", help="Upload the export (card included) to this Hub "
                                             "repo (needs HF_TOKEN; private unless --public).")]
PublicOpt = Annotated[bool, typer.Option("--public", help="With --push-to-hub: create the repo public.")]
PromptsOpt = Annotated[int, typer.Option("--prompts", min=1, help="Held-out prompts the parity check answers.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Greedy tokens per parity answer.")]


def _push(folder: Path, repo: str | None, repo_type: str, public: bool) -> None:
    from toushi.cards import push_to_hub
    from toushi.export import ExportError

    if not repo:
        return
    try:
        url = push_to_hub(folder, repo, repo_type, private=not public)
    except ExportError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - a Hub/network error, said in one line
        _fail(f"--push-to-hub {repo}: {type(e).__name__}: {e}")
    out.print(f"uploaded: {url}")


def _export_model(export, shown: str, push: str | None, public: bool) -> None:
    """Run a parity-checked model export; say its parity (a kept mismatch as a warning), print ``shown``, push."""
    from toushi.export import ExportError

    try:
        result = export()
    except ExportError as e:
        _fail(str(e))
    if not result["ok"]:
        err.print(f"[yellow]warning: parity mismatch kept (--allow-mismatch): {result['parity']}[/yellow]")
    else:
        err.print(f"parity: {result['parity']}")
    out.print(result[shown])
    _push(Path(result["dir"]), push, "model", public)


@export_app.command("merge")
def export_merge(
    run: str,
    stage: Annotated[str, typer.Option(help="Which adapter: sft, dpo, grpo, distill or selftrain.")] = "sft",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: runs/<run>/<stage>/merged.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's own).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    prompts: PromptsOpt = 8,
    max_tokens: MaxTokensOpt = 48,
    allow_mismatch: Annotated[bool, typer.Option(help="Keep a merged model that fails the parity check "
                                                      "(warn instead of failing).")] = False,
    vllm: Annotated[bool, typer.Option(help="Also check the merged model under vLLM.")] = True,
    push: PushOpt = None,
    public: PublicOpt = False,
):
    """Fold a stage's LoRA adapter into the base model (a full safetensors model for vLLM/transformers), check
    that it answers as the adapter does (transformers and vLLM), write parity.json and a model card."""
    from toushi.export import merge_checked

    rd = run_path(run)
    _export_model(lambda: merge_checked(rd, stage, out_dir, base=base, dtype=dtype, n_prompts=prompts,
                                        max_tokens=max_tokens, allow_mismatch=allow_mismatch, vllm=vllm, console=err),
                  "dir", push, public)


@export_app.command("gguf")
def export_gguf_cmd(
    run: str,
    stage: Annotated[str, typer.Option(help="Which student: sft, dpo, grpo, distill or selftrain.")] = "sft",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: runs/<run>/<stage>/gguf.")] = None,
    outtype: Annotated[str, typer.Option(help="f16, bf16, f32 or q8_0.")] = "f16",
    prompts: PromptsOpt = 8,
    max_tokens: MaxTokensOpt = 48,
    allow_mismatch: Annotated[bool, typer.Option(help="Keep a GGUF that fails the parity check.")] = False,
    push: PushOpt = None,
    public: PublicOpt = False,
):
    """The stage's merged student (merged first when missing) as GGUF via llama.cpp's converter, checked
    against the merged model through a GGUF reader; a Modelfile for Ollama and a model card beside it."""
    from toushi.gguf_export import export_gguf

    rd = run_path(run)
    _export_model(lambda: export_gguf(rd, stage, out_dir, outtype=outtype, n_prompts=prompts, max_tokens=max_tokens,
                                      allow_mismatch=allow_mismatch, console=err), "gguf", push, public)


@export_app.command("data")
def export_data_cmd(
    run: str,
    format: Annotated[str, typer.Option("--format", help="sharegpt, llamafactory, alpaca or trl.")] = "sharegpt",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: runs/<run>/export/<format>.")] = None,
    push: PushOpt = None,
    public: PublicOpt = False,
):
    """Write the SFT and DPO sets (as training uses them) with a dataset card (LLaMA-Factory's dataset_info.json
    too, except for trl)."""
    from toushi.export import ExportError, export_data

    try:
        result = export_data(run_path(run), format, out_dir)
    except ExportError as e:
        _fail(str(e))
    out.print(result)
    _push(Path(result["dir"]), push, "dataset", public)


# ----------------------------------------------------------------------------------- serving / inference


@app.command()
def serve(
    recipe: Path,
    set_: SetOpt = None,
    replicas: Annotated[int, typer.Option(min=1, help="Start this many servers on ports serve.port, +1, "
                                                      "... (each with its own GPUs); print their base_url list.")] = 1,
):
    """Serve the recipe's serve.role with vLLM's OpenAI server, the run's LoRA adapters registered by name."""
    from toushi.engines.adapters import AdapterError
    from toushi.engines.server import ServerError
    from toushi.recipe import RecipeError
    from toushi.replicas import ReplicaError, serve_replicas
    from toushi.serve import serve_forever

    # Ctrl-C (SIGINT) is how a server is stopped, and how the replica launcher stops its workers. A process
    # started with SIGINT ignored (a script's `toushi serve ... &`, or a parent that was inside system() when it
    # forked) would keep ignoring it: Python installs its KeyboardInterrupt handler only over the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    r = load(recipe, set_)
    try:
        if replicas > 1:
            code = serve_replicas(recipe, set_ or [], r, replicas, err, log_dir=r.run_dir / "serve")
        else:
            code = serve_forever(r, err)
    except (RecipeError, ServerError, AdapterError, ReplicaError) as e:
        _fail(str(e))
    raise typer.Exit(code)


@app.command()
def generate(
    recipe: Path,
    prompts: Annotated[Path | None, typer.Option(help="JSONL/JSON/CSV file or datasets dir of {id, "
                                                   "messages|prompt|text} (default: the run's held-out "
                                                   "prompts).")] = None,
    role: Annotated[str, typer.Option(help="Recipe role: student, weak, strong or judge.")] = "student",
    lora: Annotated[str | None, typer.Option(help="LoRA adapter name (sft, dpo, grpo or the spec's own).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Output JSONL (default: runs/<run>/generate/"
                                                  "<lora or role>.jsonl).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per engine call (written after each).")] = 32,
    set_: SetOpt = None,
):
    """Batch generation with a recipe role; resumable (ids already in the output are skipped)."""
    from toushi.engines import GenerationError
    from toushi.engines.adapters import AdapterError
    from toushi.generate import generate_from_recipe
    from toushi.recipe import RecipeError
    from toushi.store import StoreError

    r = load(recipe, set_)
    try:
        counts, path = generate_from_recipe(r, role, prompts, out_file, lora, batch_size, err)
    except (RecipeError, AdapterError, GenerationError, StoreError, ValueError, OSError) as e:
        _fail(str(e))
    err.print(", ".join(f"{k}={v}" for k, v in counts.items()), highlight=False)
    out.print(str(path), soft_wrap=True, highlight=False)
    if counts["failed"]:
        _fail(f"{counts['failed']} prompts failed; rerun to generate only those")


@app.command()
def chat(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[str | None, typer.Option(help="Model or adapter name (default: the first listed).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key.")] = None,
    system_file: Annotated[Path | None, typer.Option(help="Text file used as the system prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 512,
):
    """Streaming multi-turn chat in the terminal (/reset clears the history, /exit quits)."""
    import openai

    from toushi.chat import run_terminal

    try:
        run_terminal(base_url, model, api_key_env, system_file, temperature, max_tokens)
    except (ValueError, OSError, openai.APIError) as e:
        _fail(str(e))


def main() -> None:
    """The `toushi` command. A toushi error that no command turned into its own message is still one line (its
    message names the file, key or model and what to do), not a traceback."""
    from toushi.errors import ToushiError

    try:
        app()
    except ToushiError as e:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
