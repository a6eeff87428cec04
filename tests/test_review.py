"""`toushi review`: the guidance review page, in a real browser against a real server on loopback.

The run directory is written by hand (pairs, guided and eval records, a hand-written guidance that the real
runner turns into the guidance stage's output), so no model runs; the rerun check uses the runner itself.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_report import chromium_path
from typer.testing import CliRunner

from toushi.recipe import load_recipe, run_overrides
from toushi.runner import fingerprint, plan, run_stages
from toushi.stages import STAGES
from toushi.store import StageStore

POSTS = {
    "a1": ("train", "My sister stopped talking to me after the wedding and I don't know why."),
    "a2": ("train", "我最近总是失眠，工作压力太大了，感觉快撑不下去了。"),
    "a3": ("train", "I failed the bar exam for the second time."),
    "h1": ("heldout", "My cat has been sick for weeks and the vet bills are piling up."),
}
GUIDANCE = """# Guidance

## Empathy

Show that you heard the feeling before anything else.

- Name the feeling the poster states in their own words (support 3; pairs: a1, a2)
- 先承认对方的感受，再给建议 (support 2; pairs: a2)

## Specificity

Refer to the poster's details.

- Mention one concrete detail from the post (support 2; pairs: a3, h1)
"""
NEW_RULE = "Reflect the poster's exact feeling back in one short sentence before anything else"


def write_run(root: Path) -> tuple[Path, Path]:
    """A run with pairs, guided and eval records and a recipe whose guidance is a hand-written file."""
    run_dir = root / "runs" / "demo"
    pairs = [{"id": pid, "split": split, "lang": "zh" if pid == "a2" else "en", "scene": "family", "post": post,
              "prompt": f"Comment on this post:\n{post}", "weak": [{"text": f"weak answer to {pid}. Stay strong!"}],
              "strong": [{"text": f"strong answer to {pid}: that sounds so hard."}]} for pid, (split, post) in POSTS.items()]
    pairs[1]["strong"] = [{"text": "听起来你真的很累，这种压力让人喘不过气。"}]
    with StageStore(run_dir, "pairs").writer() as w:
        w.write_many(pairs)
    with StageStore(run_dir, "guided").writer() as w:
        w.write_many([{"id": p["id"], "split": p["split"], "prompt": p["prompt"],
                       "guided": [{"text": f"guided answer to {p['id']}"}]} for p in pairs])
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "records.jsonl").write_text(json.dumps(
        {"id": "e1", "system": "sft", "prompt_id": "h1", "post": POSTS["h1"][1], "text": "sft answer to h1"}) + "\n")
    (run_dir / "eval" / "summary.json").write_text(json.dumps({
        "judge": {"pairs": [{"prompt_id": "h1", "system": "sft", "reference": "weak", "outcome": 1.0}]},
        "seeker": {"items": [{"prompt_id": "h1", "system": "sft", "before": 30, "after": 55, "delta": 25,
                              "valid": True, "whys": ["someone noticed the vet bills"]}]}}))
    guidance = root / "guidance.md"
    guidance.write_text(GUIDANCE, encoding="utf-8")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "demo", "dir": str(root / "runs"), "stages": ["guidance", "guided"]},
        "models": {"weak": {"name": "tiny-random"}}, "guidance": {"edited_file": str(guidance)}}))
    return run_dir, recipe


def run_guidance_stage(recipe_path: Path):
    """The guidance stage through the runner, the recipe resolved as `toushi run` resolves it."""
    r = load_recipe(recipe_path, ["run.stages=[guidance]"], with_run_overrides=True)
    assert run_stages(r, STAGES) == {"guidance": "ran"}
    return StageStore(r.run_dir, "guidance").manifest()


def mark_guided_done(recipe_path: Path) -> None:
    """The guided stage's manifest as a finished run of it leaves it (its records are written above)."""
    r = load_recipe(recipe_path, with_run_overrides=True)
    by_name = {s.name: s for s in STAGES}
    fp, upstream = fingerprint(r, by_name["guided"], by_name)
    StageStore(r.run_dir, "guided").write_manifest(status="complete", fingerprint=fp, inputs=upstream,
                                                   recipe_hash=r.section_hash(*by_name["guided"].sections))


def zh_font() -> bool:
    """A font with Chinese glyphs is installed (make test installs fonts-wqy-microhei with Chromium)."""
    import shutil
    import subprocess

    fc = shutil.which("fc-list")
    return bool(fc and subprocess.run([fc, ":lang=zh"], capture_output=True, text=True).stdout.strip())


def full_plan(recipe_path: Path) -> dict[str, str | None]:
    return dict(plan(load_recipe(recipe_path, with_run_overrides=True), STAGES))


@pytest.fixture
def served(tmp_path):
    """(run_dir, recipe, base URL) with the review app served by uvicorn on a free loopback port."""
    import uvicorn

    from toushi.recipe import save_recipe
    from toushi.review import make_app

    run_dir, recipe = write_run(tmp_path)
    run_guidance_stage(recipe)
    save_recipe(load_recipe(recipe), run_dir)  # the run's recipe, as `toushi run` saves it (every stage)
    mark_guided_done(recipe)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(run_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "review server did not start"
        time.sleep(0.05)
    yield run_dir, recipe, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_review_page_edit_saves_version_and_reruns(served):
    """In headless Chromium: zh and en text render, a rule's cited pair is one click away, editing a rule saves
    a new version (diff shown, 'edited by a person') that becomes the run's guidance.edited_file, and the next
    run reruns guidance (and, through it, guided) and says why."""
    run_dir, recipe, url = served
    assert full_plan(recipe) == {"guidance": None, "guided": None}  # nothing to do before the edit
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium here (make test installs Debian's chromium; or set TOUSHI_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        body = page.inner_text("body")
        assert "先承认对方的感受，再给建议" in body and "我最近总是失眠" in body and "听起来你真的很累" in body
        assert "Name the feeling the poster states in their own words" in body
        assert page.inner_text("#plan") == "guidance: up to date\nguided: up to date"
        # the held-out post: every answer side by side, the student's with the judge and the seeker
        h1 = page.locator("#post-h1")
        assert h1.locator(".answer").evaluate_all("els => els.map(e => e.dataset.system)") == [
            "weak", "guided", "strong", "sft"]
        sft = h1.locator(".answer[data-system=sft]").inner_text()
        assert "beats weak (1.00)" in sft and "30 → 55 (+25) someone noticed the vet bills" in sft
        boxes = [b["x"] for b in (h1.locator(f".answer[data-system={s}]").bounding_box() for s in ("weak", "guided"))]
        assert boxes[1] > boxes[0] + 200  # side by side, not stacked
        if zh_font():  # drawn in a real font: a run of zh text does not look like missing-glyph boxes
            boxes = "".join(chr(0xE000 + i) for i in range(8))  # private-use: no font draws them
            page.evaluate("""probes => probes.forEach(([id, text]) => {
                const s = document.createElement('span'); s.id = id; s.textContent = text; document.body.prepend(s);
            })""", [["zh-probe", "先承认对方的感受"], ["box-probe", boxes]])
            assert page.locator("#zh-probe").screenshot() != page.locator("#box-probe").screenshot()
        # the first rule cites a1 and a2: one click goes to the post
        page.locator("#rule-0-0 a", has_text="a2").click()
        assert page.evaluate("location.hash") == "#post-a2"
        assert page.locator("#post-a2").evaluate("e => e.matches(':target')")

        rule = page.locator("#rule-0-0")
        rule.locator("details.edit summary").click()
        rule.locator("textarea").fill(NEW_RULE)
        rule.locator("button", has_text="save").click()
        page.wait_for_url(re.compile(r"saved=guidance\.v001\.md"))
        assert "Saved guidance.v001.md" in page.inner_text("#change")
        diff = page.inner_text("#diff")
        assert "-- Name the feeling the poster states in their own words" in diff
        assert f"+- {NEW_RULE} (support 3; pairs: a1, a2; flags: edited by a person)" in diff
        assert page.locator("#rule-0-0 .flag.person").inner_text() == "edited by a person"
        plan_text = page.inner_text("#plan")
        assert "guidance: changed: recipe settings, file guidance.edited_file" in plan_text
        assert "guided: reads guidance, which reruns" in plan_text
        browser.close()
    assert not errors

    version = run_dir / "review" / "guidance.v001.md"
    text = version.read_text(encoding="utf-8")
    assert NEW_RULE in text and "Name the feeling the poster" not in text and "先承认对方的感受" in text
    assert run_overrides(run_dir) == {"guidance.edited_file": str(version.resolve())}
    log = [json.loads(line) for line in (run_dir / "review" / "log.jsonl").read_text().splitlines()]
    assert [(e["version"], e["action"]) for e in log] == [(1, "edit")]
    # the next run: the runner reruns guidance from the new version and says why; guided follows
    manifest = run_guidance_stage(recipe)
    assert manifest["rerun_reason"] == "changed: recipe settings, file guidance.edited_file"
    assert manifest["edited_file"] == str(version.resolve())
    kept = json.loads((run_dir / "guidance" / "guidance.json").read_text(encoding="utf-8"))
    first = kept["dimensions"][0]["rules"][0]
    assert first["text"] == NEW_RULE and first["flags"] == ["edited by a person"] and NEW_RULE in kept["system_prompt"]
    assert full_plan(recipe) == {"guidance": None, "guided": "changed: guidance output"}


def test_review_refuses_cross_site_and_remote(served, tmp_path):
    """A state-changing request needs the page's token and, when sent, the page's own Origin; a foreign Host
    is refused (DNS rebinding); a non-loopback bind needs --allow-remote. Accept, add and delete save versions."""
    from toushi.cli import app

    run_dir, _, url = served
    token = re.search(r'name="token" value="([^"]+)"', httpx.get(url + "/").text).group(1)
    form = {"action": "accept", "dim": "1", "rule": "0"}
    assert httpx.post(url + "/edit", data=form).status_code == 403  # no token: a form from elsewhere
    evil = httpx.post(url + "/edit", data={**form, "token": token}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "evil.example" in evil.text
    assert httpx.get(url + "/", headers={"Host": "evil.example"}).status_code == 400
    assert not (run_dir / "review").exists()  # nothing was saved

    ok = httpx.post(url + "/edit", data={**form, "token": token}, headers={"Origin": url})
    assert ok.status_code == 303 and ok.headers["location"].startswith("/?saved=guidance.v001.md")
    added = httpx.post(url + "/edit", data={"action": "add", "dim": "1", "text": "问一个开放式的问题", "token": token})
    assert added.status_code == 303
    bad = httpx.post(url + "/edit", data={"action": "delete", "dim": "1", "rule": "9", "token": token})
    assert bad.status_code == 400 and "no rule 9" in bad.text
    assert httpx.post(url + "/edit", data={"action": "delete", "dim": "0", "rule": "1", "token": token}).status_code == 303
    v3 = (run_dir / "review" / "guidance.v003.md").read_text(encoding="utf-8")
    assert "flags: accepted by a person" in v3 and "- 问一个开放式的问题 (support 0; flags: added by a person)" in v3
    assert "先承认对方的感受" not in v3 and "先承认对方的感受" in (run_dir / "review" / "guidance.v003.diff").read_text()

    res = CliRunner().invoke(app, ["review", str(run_dir), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--allow-remote" in res.output
