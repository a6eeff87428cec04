"""``toushi review RUN``: a local web page to read a run's answers side by side and correct its guidance.

The page shows each post with its weak, guided and strong answers (and, for held-out posts, the students'
answers from eval with the judge's verdict and the simulated seeker's feeling), and the guidance's dimensions
and rules, each rule with its support count and links to the pairs it cites. A person may accept, edit or
delete a rule, or add one. Every change is saved as a new version file, ``runs/<run>/review/guidance.vNNN.md``
(with ``.diff`` from the version before and a line in ``review/log.jsonl``); edited rules carry the flag
"edited by a person" (added ones "added by a person", accepted ones "accepted by a person"). The newest
version becomes the run's ``guidance.edited_file`` through ``runs/<run>/overrides.yaml``, which ``toushi run``
layers between the recipe and ``--set``: the next run of the recipe reruns guidance, guided and what reads
them, and the page says which and why (``toushi.runner.plan``).

Safe on a shared machine: it binds to loopback unless told otherwise, answers only to loopback host names,
and every state-changing request must carry the page's per-server token and, when the browser sends one, an
Origin equal to the page's own (a page elsewhere in the user's browser cannot post edits).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import secrets
import time
from pathlib import Path

import jinja2

from toushi.errors import ToushiError
from toushi.guidance.memory import Memory, Rule
from toushi.guidance.render import read_guidance_file, to_markdown
from toushi.recipe import RecipeError, load_recipe, run_overrides, set_run_override
from toushi.store import StageStore, atomic_write_text

EDITED, ADDED, ACCEPTED = "edited by a person", "added by a person", "accepted by a person"
MAX_RULE_CHARS = 1000
MAX_POSTS = 300  # posts shown by default (cited and held-out first); ?all=1 shows every one
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates" / "review")),
    autoescape=True,  # answers and rules are data, never markup
    undefined=jinja2.StrictUndefined,
)


class ReviewError(ToushiError, ValueError):
    """A run the page cannot show, or an edit it cannot make; the message says what to do."""


# ------------------------------------------------------------------------------------------ the run


def run_recipe(run_dir: Path):
    """The run's recipe as the next `toushi run` of it would resolve it: the saved recipe, then the run's
    overrides. Run `toushi review` from the directory `toushi run` was run from (recipe paths are relative)."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise ReviewError(f"{run_dir}: no recipe.yaml (run `toushi run RECIPE` for this run first)")
    try:
        return load_recipe(saved, [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"], check_files=False,
                           with_run_overrides=True)
    except RecipeError as e:
        raise ReviewError(str(e)) from None


def current_guidance(run_dir: Path) -> tuple[Path, Memory, dict]:
    """(file, memory, meta): the run's edited guidance when it has one, else the guidance stage's output."""
    edited = run_overrides(run_dir).get("guidance.edited_file")
    path = Path(edited) if edited and Path(edited).is_file() else run_dir / "guidance" / "guidance.json"
    if not path.is_file():
        raise ReviewError(f"{run_dir}: no guidance/guidance.json (run the guidance stage first)")
    memory, meta = read_guidance_file(path)
    return path, memory, meta


def _first_text(completions) -> str:
    return ((completions or [{}])[0].get("text") or "").strip()


def _verdict(outcome: float | None, reference: str) -> str:
    if outcome is None:
        return "no valid verdict"
    word = "beats" if outcome > 0.5 else "loses to" if outcome < 0.5 else "ties with"
    return f"{word} {reference} ({outcome:.2f})"


def posts(run_dir: Path, cited: set[str], show_all: bool) -> tuple[list[dict], int]:
    """Posts with their answers side by side, cited and held-out posts first; (shown, hidden count)."""
    pairs = StageStore(run_dir, "pairs").records()
    guided = {g["id"]: _first_text(g.get("guided")) for g in StageStore(run_dir, "guided").records()}
    students: dict[str, list[dict]] = {}
    for rec in StageStore(run_dir, "eval").records():
        if rec.get("system") not in ("weak", "guided", "strong"):
            students.setdefault(rec["prompt_id"], []).append({"system": rec["system"], "text": rec.get("text") or ""})
    summary_path = run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    verdicts = {(p["prompt_id"], p["system"]): _verdict(p.get("outcome"), p.get("reference", "?"))
                for p in (summary.get("judge") or {}).get("pairs") or []}
    feelings = {}
    for it in (summary.get("seeker") or {}).get("items") or []:
        if it.get("valid"):
            why = next((w for w in reversed(it.get("whys") or []) if w), "")
            feelings[(it["prompt_id"], it["system"])] = f"{it['before']} → {it['after']} ({it['delta']:+d}) {why}"
    out = []
    for rec in pairs:
        pid = rec["id"]
        answers = [{"system": "weak", "text": _first_text(rec.get("weak"))},
                   {"system": "guided", "text": guided.get(pid)},
                   {"system": "strong", "text": _first_text(rec.get("strong"))}]
        answers += students.get(pid, [])  # eval's students: held-out posts only
        for a in answers:
            a.update(judge=verdicts.get((pid, a["system"])), seeker=feelings.get((pid, a["system"])))
        out.append({"id": pid, "post": rec.get("post") or rec.get("prompt") or "", "split": rec.get("split"),
                    "scene": rec.get("scene"), "lang": rec.get("lang"), "answers": answers})
    out.sort(key=lambda p: (p["id"] not in cited, p["split"] != "heldout"))  # stable: run order otherwise
    if show_all or len(out) <= MAX_POSTS:
        return out, 0
    return out[:MAX_POSTS], len(out) - MAX_POSTS


def versions(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "review").glob("guidance.v*.md"))


def latest_diff(run_dir: Path) -> tuple[str | None, str]:
    vs = versions(run_dir)
    if not vs:
        return None, ""
    diff = vs[-1].with_suffix(".diff")
    return vs[-1].name, diff.read_text(encoding="utf-8") if diff.is_file() else ""


# ------------------------------------------------------------------------------------------ edits


def apply_edit(memory: Memory, action: str, dim: int, rule: int | None, text: str) -> str:
    """Change ``memory`` in place; returns one line saying what changed (for the log and the page)."""
    if not 0 <= dim < len(memory.dimensions):
        raise ReviewError(f"no dimension {dim} (the guidance has {len(memory.dimensions)})")
    d = memory.dimensions[dim]
    text = " ".join(text.split())  # a rule is one line in guidance.md
    if action in ("edit", "add") and not text:
        raise ReviewError("the rule text is empty (to remove a rule, delete it)")
    if len(text) > MAX_RULE_CHARS:
        raise ReviewError(f"the rule text is {len(text)} characters; keep it under {MAX_RULE_CHARS}")
    if action == "add":
        # no pair supports a person's rule: support 0, and the flag says where it came from
        d.rules.append(Rule(text, 0, [], [ADDED]))
        return f"added to {d.name}: {text}"
    if rule is None or not 0 <= rule < len(d.rules):
        raise ReviewError(f"no rule {rule} in dimension {d.name!r} (it has {len(d.rules)})")
    r = d.rules[rule]
    if action == "delete":
        del d.rules[rule]
        return f"deleted from {d.name}: {r.text}"
    if action == "accept":
        r.flags = [*r.flags, ACCEPTED] if ACCEPTED not in r.flags else r.flags
        return f"accepted in {d.name}: {r.text}"
    if action == "edit":
        if text == r.text:
            raise ReviewError("the rule text is unchanged")
        before, r.text = r.text, text
        r.flags = [*r.flags, EDITED] if EDITED not in r.flags else r.flags
        return f"edited in {d.name}: {before} -> {text}"
    raise ReviewError(f"unknown action {action!r} (accept, edit, delete or add)")


def save_version(run_dir: Path, action: str, dim: int, rule: int | None, text: str) -> Path:
    """Apply one edit to the current guidance, write it as the next version with its diff, and make it the
    run's guidance.edited_file. Returns the new version file."""
    source, memory, meta = current_guidance(run_dir)
    before_md = source.read_text(encoding="utf-8") if source.suffix == ".md" else to_markdown(memory, meta)
    what = apply_edit(memory, action, dim, rule, text)
    review = run_dir / "review"
    n = 1 + max((int(p.name.split(".v")[1].split(".")[0]) for p in versions(run_dir)), default=0)
    path = review / f"guidance.v{n:03d}.md"
    md = to_markdown(memory, {"mode": "edited in toushi review", "version": n, "pairs": meta.get("pairs", "?")})
    atomic_write_text(path, md)
    atomic_write_text(path.with_suffix(".diff"), "".join(difflib.unified_diff(
        before_md.splitlines(True), md.splitlines(True), source.name, path.name)))
    with (review / "log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"version": n, "file": path.name, "from": str(source), "action": action, "what": what,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, ensure_ascii=False) + "\n")
    set_run_override(run_dir, "guidance.edited_file", str(path.resolve()), by="toushi review")
    return path


# ------------------------------------------------------------------------------------------ the app


def page(run_dir: Path, token: str, show_all: bool = False, message: str | None = None) -> str:
    from toushi.runner import plan
    from toushi.stages import STAGES

    recipe = run_recipe(run_dir)
    source, memory, meta = current_guidance(run_dir)
    cited = {pid for d in memory.dimensions for r in d.rules for pid in r.pair_ids}
    shown, hidden = posts(run_dir, cited, show_all)
    known = {p["id"] for p in shown}
    version, diff = latest_diff(run_dir)
    return _env.get_template("index.html.j2").render(
        run=run_dir.name, lang=recipe.run.lang, token=token, source=source, memory=memory, posts=shown,
        hidden=hidden, known=known, version=version, diff=diff, message=message,
        plan=[(name, why) for name, why in plan(recipe, STAGES)],
        flags=(EDITED, ADDED, ACCEPTED),
    )


def make_app(run_dir: Path, host: str = "127.0.0.1", allow_remote: bool = False):
    """The Starlette app serving one run's review page (token and allowed hosts fixed per app)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    run_dir = Path(run_dir)
    token = secrets.token_urlsafe(32)
    run_recipe(run_dir)  # a run the page cannot show fails before serving, not on the first request
    current_guidance(run_dir)

    async def index(request):
        return HTMLResponse(page(run_dir, token, show_all=request.query_params.get("all") == "1",
                                 message=request.query_params.get("saved")))

    async def edit(request):
        # cross-site requests: a form posted from another origin carries that Origin, and never our token
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            return PlainTextResponse(f"refused: a request from {origin}", status_code=403)
        form = await request.form()
        if not secrets.compare_digest(str(form.get("token", "")), token):
            return PlainTextResponse("refused: missing or stale page token (reload the page)", status_code=403)
        try:
            rule = form.get("rule")
            path = save_version(run_dir, str(form.get("action", "")), int(form.get("dim", -1)),
                                int(rule) if rule not in (None, "") else None, str(form.get("text", "")))
        except (ReviewError, ValueError) as e:
            return PlainTextResponse(f"not saved: {e}", status_code=400)
        return RedirectResponse(f"/?saved={path.name}#change", status_code=303)

    hosts = ["*"] if allow_remote else [*LOOPBACK_NAMES, "[::1]", host]
    return Starlette(routes=[Route("/", index), Route("/edit", edit, methods=["POST"])],
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


def check_bind(host: str, allow_remote: bool) -> None:
    if host in LOOPBACK_NAMES:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ReviewError(f"--host {host} is not a loopback address and the page edits the run: "
                          "pass --allow-remote to bind it anyway")


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False) -> None:
    import uvicorn

    check_bind(host, allow_remote)
    app = make_app(run_dir, host, allow_remote)
    print(f"review page for {run_dir}: http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
