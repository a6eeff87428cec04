"""The report renders from a run directory, and every image it references exists and is a real PNG."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
from typer.testing import CliRunner

from toushi.eval.evaluate import answer_metrics, summarise, truncation
from toushi.eval.judge import PairTask, aggregate, rubric, win_rates
from toushi.eval.simulate import seeker_summary
from toushi.report import ReportError, build_report

SYSTEMS = ["weak", "guided", "student", "sft", "dpo", "strong"]
DIMS = rubric("en")
POSTS = [f"Post {i}: my dog died and I keep setting out two bowls." for i in range(6)]
EMOTIONS = ["sadness"] * 4 + ["anger"] * 2  # two emotions, for the tables by emotion
IMAGES = {"win_rates.png", "lengths.png", "nll.png", "drift.png", "training_sft.png", "training_dpo.png", "ladder.png"}
# the ladder's scripted steps (both orders' verdicts for the rung, and its seeker change vs the rung before):
# guided beats weak; sft beats guided by the judge, but the seeker feels no different; dpo vs sft is
# order-inconsistent (ties) and the seeker feels worse; strong loses to dpo by the judge, the seeker feels better
LADDER_JUDGE = {"guided": ("A", "B"), "sft": ("A", "B"), "dpo": ("A", "A"), "strong": ("B", "A")}
SEEKER_DELTA = {"weak": [0, 1] * 3, "student": [3] * 6}
SEEKER_DELTA["guided"] = [d + 8 for d in SEEKER_DELTA["weak"]]
SEEKER_DELTA["sft"] = [d + e for d, e in zip(SEEKER_DELTA["guided"], [-2, 2] * 3)]
SEEKER_DELTA["dpo"] = [d - 5 for d in SEEKER_DELTA["sft"]]
SEEKER_DELTA["strong"] = [d + 10 for d in SEEKER_DELTA["dpo"]]


def answer(system: str, i: int) -> str:
    if system == "weak":
        return "- Stay strong!\n- **Time heals**" if i % 2 else "Sorry for your loss."
    if system == "sft" and i == 0:
        return "<script>alert('x')</script> Setting out two bowls is love with nowhere to go."
    return f"({system}) Setting out two bowls says how much you loved them. " * (1 + i % 3)


def make_run(root: Path, with_extras: bool = True) -> Path:
    run = root / "runs" / "demo"
    records = []
    for s in SYSTEMS:
        for i, post in enumerate(POSTS):
            text = answer(s, i)
            records.append({"id": f"{s}-{i}", "system": s, "prompt_id": f"p{i}", "lang": "en", "post": post,
                            "scene": "pet loss", "emotion": EMOTIONS[i], "intent": None,
                            "text": text, "metrics": {**answer_metrics(post, text), "embed_sim": 0.5 + i / 20},
                            "truncated": s == "strong" and i == 0})  # one strong answer ran out of tokens
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    nll = [{"system": s, "prompt_id": f"p{i}", "nll_sum": 20.0 + i + k, "tokens": 10, "nll": (20.0 + i + k) / 10}
           for k, s in enumerate(["student", "sft", "dpo"]) for i in range(6)]
    # judge: real aggregation over hand-written call records (sft always wins, dpo position-biased)
    tasks = [PairTask(f"p{i}", "en", POSTS[i], s, answer(s, i), "weak", answer("weak", i))
             for s in SYSTEMS if s != "weak" for i in range(6)]
    calls = []
    for t in tasks:
        for order in ("sr", "rs"):
            v = ("A" if order == "sr" else "B") if t.system != "dpo" else "A"
            if t.system == "guided" and t.prompt_id == "p0":
                calls.append({"pair_id": t.pair_id, "order": order, "valid": False, "verdict": None, "dims": None})
                continue
            calls.append({"pair_id": t.pair_id, "order": order, "valid": True, "verdict": v,
                          "dims": {d["name"]: v for d in DIMS}})
    pairs = aggregate(tasks, calls, DIMS)
    rungs = ["weak", "guided", "sft", "dpo", "strong"]
    ladder_tasks = [PairTask(f"p{i}", "en", POSTS[i], cur, answer(cur, i), prev, answer(prev, i))
                    for prev, cur in zip(rungs, rungs[1:]) for i in range(6)]
    ladder_calls = [{"pair_id": t.pair_id, "order": order, "valid": True, "verdict": v,
                     "dims": {d["name"]: v for d in DIMS}}
                    for t in ladder_tasks for order, v in zip(("sr", "rs"), LADDER_JUDGE[t.system])]
    judge = {"model": "scripted", "reference": "weak", "dimensions": [d["name"] for d in DIMS],
             "calls": len(calls), "invalid_calls": 2, "retried_calls": 2,
             "systems": win_rates(pairs, DIMS, n_boot=50), "pairs": pairs,
             "ladder_calls": len(ladder_calls), "ladder_invalid_calls": 0,
             "self_judged": ["strong"],  # the strong model judged (no models.judge)
             "ladder_pairs": aggregate(ladder_tasks, ladder_calls, DIMS)}
    items = [{"system": s, "prompt_id": f"p{i}", "before": 40, "after": 40 + d, "delta": d, "valid": True,
              "feelings": [40 + d], "whys": ["scripted"], "transcript": None}
             for s in SYSTEMS for i, d in enumerate(SEEKER_DELTA[s])]
    seeker = {"model": "scripted", "role": "strong", "turns": 1, "posts": 6, "calls": 6 + len(items),
              "invalid_calls": 0, "generated": 0, "systems": seeker_summary(items, n_boot=50), "before": [40] * 6,
              "items": items}
    summary = summarise(records, nll, judge, n_boot=50, seed=0, seeker=seeker)
    summary.update(run="demo", lang="en", n_prompts=6, prompt_ids=[f"p{i}" for i in range(6)],
                   notes=["grpo: no adapter, skipped"], student_model="smollm2-135m-instruct",
                   truncation=truncation(records))
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    if with_extras:
        (run / "guidance").mkdir()
        # the shape the guidance stage writes (toushi.guidance.session)
        (run / "guidance" / "drift.json").write_text(json.dumps({"threshold": 0.3, "chosen": 2, "rounds": [
            {"round": r, "version": r, "label": f"map-{r}", "score": 0.05 * r, "flagged": r == 3} for r in range(4)]}))
        for stage, key in (("sft", "loss"), ("dpo", "rewards/margins")):
            ck = run / stage / "checkpoint-4"
            ck.mkdir(parents=True)
            hist = [{"step": s, "loss": 2.0 / s, key: 0.1 * s} for s in range(1, 5)]
            (ck / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
            (run / stage / "trainer_state.json").write_text(json.dumps({"log_history": hist[:2]}))
    return run


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders_every_part_and_images_exist(tmp_path):
    run = make_run(tmp_path)
    index = build_report(run)
    assert index == run / "report" / "index.html"
    html = index.read_text()
    refs = _Refs()
    refs.feed(html)
    expected = IMAGES
    assert set(refs.srcs) == expected
    for src in refs.srcs:  # relative, beside the HTML, and a readable PNG
        img = index.parent / src
        assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(img).shape[0] > 50
    text = " ".join(refs.text)
    for s in SYSTEMS:  # every system is a column of the table and appears in the examples
        assert f"<th>{s}</th>" in html
        assert f"<h4>{s}</h4>" in html
    assert "length-controlled win rate vs weak" in text and "held-out NLL" in text
    assert "grpo: no adapter, skipped" in text
    # each system's truncation rate, and a judge that judged its own answers is named
    row = re.search(r"<td>truncated answers \(cut off at max_tokens\) ↓</td>(.*?)</tr>", html, re.S)
    assert row and re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1)) == [
        "17% (1/6)" if s == "strong" else "0% (0/6)" for s in SYSTEMS]
    assert "also wrote the answers of strong; it is judging itself" in text
    # answers are escaped, never executed
    assert "<script>" not in html and "&lt;script&gt;" in html
    # the table holds CIs: "mean [lo, hi]"
    assert re.search(r"<td>\d\.\d\d \[\d\.\d\d, \d\.\d\d\]</td>", html)
    md = (index.parent / "report.md").read_text()
    md_imgs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(md_imgs) == expected and all((index.parent / m).exists() for m in md_imgs)
    assert "| sft |" in md and "> (strong) Setting out two bowls" in md
    # the longer history (the checkpoint's) is the one drawn
    assert "training_sft.png" in html and "sft: 4 steps" in text


def test_report_of_a_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "runs" / "early"
    (run / "pairs").mkdir(parents=True)
    index = build_report(run)
    html = index.read_text()
    assert "no eval results" in html and "<img" not in html


def test_bad_inputs_name_the_file(tmp_path):
    run = make_run(tmp_path, with_extras=False)
    (run / "guidance").mkdir()
    (run / "guidance" / "drift.json").write_text(json.dumps([{"score": 1}]))
    with pytest.raises(ReportError, match="drift.json"):
        build_report(run)
    with pytest.raises(ReportError, match="no such run"):
        build_report(tmp_path / "nowhere")


def test_cli_report_prints_the_path(tmp_path, monkeypatch):
    from toushi.cli import app

    run = make_run(tmp_path, with_extras=False)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["report", "demo"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("index.html")
    assert Path(res.output.strip()).exists() and Path(res.output.strip()) == (run / "report" / "index.html").resolve()
    res = CliRunner().invoke(app, ["report", "missing-run"])
    assert res.exit_code == 2


def chromium_path() -> str | None:
    """Debian's Chromium (``make test`` installs it where it can); TOUSHI_CHROMIUM points elsewhere."""
    import os
    import shutil

    return os.environ.get("TOUSHI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(tmp_path):
    """The report as a person sees it: every plot decodes in a real browser, the tables lay out, and the
    page runs no script (answers are data, not markup)."""
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("no Chromium here (make test installs Debian's chromium; or set TOUSHI_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    index = build_report(make_run(tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs, errors = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth, e.naturalHeight])")
        assert {src for src, *_ in images} == IMAGES
        for src, complete, width, height in images:
            assert complete and width > 100 and height > 50, src  # decoded, not a broken-image icon
        header = page.eval_on_selector_all("table th", "els => els.map(e => e.textContent.trim())")
        assert set(SYSTEMS) <= set(header)
        assert page.locator("table").first.bounding_box()["width"] > 300
        # the ladder in pipeline order, each rung against the one before, with what each step did
        rows = page.eval_on_selector_all(
            "#ladder tr.rung", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent.trim()))")
        assert [r[0] for r in rows] == ["weak", "guided", "sft", "dpo", "strong"]
        assert [r[1] for r in rows] == ["(first rung)", "weak", "guided", "sft", "dpo"]
        assert [r[4] for r in rows] == ["", "helped", "helped", "no clear change", "hurt"]  # the judge
        assert [r[6] for r in rows] == ["", "helped", "no clear change", "hurt", "helped"]  # the seeker
        assert rows[1][2] == "1.00" and rows[1][3] == "6/0/0" and rows[3][3] == "0/6/0"
        assert rows[1][5].startswith("+8.") and rows[3][5] == "-5.0"  # paired change in feeling vs previous
        colours = page.eval_on_selector_all("#ladder td.verdict", "els => els.map(e => getComputedStyle(e).color)")
        assert "rgb(26, 127, 55)" in colours and "rgb(207, 34, 46)" in colours  # helped green, hurt red
        assert page.locator("#ladder").bounding_box()["width"] > 300
        seeker = page.eval_on_selector_all("#seeker tr", "rows => rows.map(r => r.cells[0].textContent.trim())")
        assert seeker[1:] == SYSTEMS
        by_emotion = page.eval_on_selector_all(
            "#strata-emotion-judge tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent.trim()))")
        assert [r[:2] for r in by_emotion[1:]] == [["sadness", "4"], ["anger", "2"]]
        assert page.locator("#strata-emotion-judge tr.few").count() == 2  # both cells under 5 posts
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not dialogs and not errors  # the <script> in an sft answer stayed text
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 900 and pixels.std() > 0.05  # a long page with something drawn on it
