"""Post labels: ESConv's emotion and problem type survive corpus -> pairs -> eval; the tagger's closed label sets,
its parsing and its agreement with known labels; `toushi corpus tag` on the offline model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from toushi.corpus.loaders import normalise_scene
from toushi.corpus.tagging import INVALID, agreement, label_set, parse_tags, tag_schema
from toushi.recipe import Recipe
from toushi.runner import run_stages
from toushi.stages import STAGES
from toushi.store import StageStore


def test_label_sets_are_closed_and_shared_across_languages():
    en, zh = label_set("en"), label_set("zh")
    for kind in ("emotion", "intent"):
        assert [x["label"] for x in en[kind]] == [x["label"] for x in zh[kind]]  # stored labels: one vocabulary
        assert all(x["definition"] for x in en[kind] + zh[kind])
    assert {"anxiety", "depression", "sadness", "anger", "fear", "shame", "disgust"} <= {x["label"] for x in en["emotion"]}
    assert {x["label"] for x in en["intent"]} == {"be_heard", "comfort", "advice", "vent_anger"}
    schema = tag_schema(zh)
    assert schema["properties"]["emotion"]["enum"][0] == "焦虑" and schema["required"] == ["emotion", "intent"]


@pytest.mark.parametrize("output, expected", [
    ('{"emotion": "anger", "intent": "to vent anger"}', ("anger", "vent_anger")),
    ('Sure! {"emotion": "Sadness", "intent": "to be comforted"} hope it helps', ("sadness", "comfort")),
    ("The writer mostly feels loneliness and wants to be heard.", ("loneliness", "be_heard")),
    ('{"emotion": "joy", "intent": "to get advice"}', (None, "advice")),  # not a label of the set
    ("anxiety or fear, hard to say", (None, None)),  # two names: no guess
    ("", (None, None)),
])
def test_parse_tags(output, expected):
    tags = parse_tags(output, label_set("en"))
    assert (tags["emotion"], tags["intent"]) == expected


def test_tagger_accuracy_against_known_labels():
    gold = ["anxiety", "anxiety", "anxiety", "anger", "anger", "nervousness", None, "sadness"]
    pred = ["anxiety", "fear", None, "anger", "anger", "anxiety", "anger", "sadness"]
    rep = agreement(gold, pred, ["anxiety", "sadness", "anger", "fear", "shame"])
    # 7 posts with a known label (the unlabelled one is not scored); 4 right
    assert rep["n"] == 7 and rep["correct"] == 4 and rep["accuracy"] == pytest.approx(4 / 7)
    # "nervousness" is outside the tagger's set: it can never be matched, so it is also left out of in_set
    assert rep["in_set_n"] == 6 and rep["in_set_accuracy"] == pytest.approx(4 / 6)
    assert rep["invalid"] == 1
    assert rep["gold_labels"] == ["anxiety", "anger", "nervousness", "sadness"]  # most frequent first
    assert rep["predicted_labels"] == ["anxiety", "sadness", "anger", "fear", INVALID]  # the set's order
    confusion = {g: dict(zip(rep["predicted_labels"], row)) for g, row in zip(rep["gold_labels"], rep["confusion"])}
    assert confusion["anxiety"] == {"anxiety": 1, "sadness": 0, "anger": 0, "fear": 1, INVALID: 1}
    assert confusion["nervousness"]["anxiety"] == 1 and confusion["anger"]["anger"] == 2
    assert sum(map(sum, rep["confusion"])) == rep["n"]
    assert sum(rep["confusion"][i][rep["predicted_labels"].index(g)] for i, g in enumerate(rep["gold_labels"])
               if g in rep["predicted_labels"]) == rep["correct"]
    assert agreement([None, None], ["anger", None])["accuracy"] is None


def test_labels_survive_from_an_esconv_file_to_eval_records(tmp_path, shared_data, tiny_model):
    """The real corpus, pairs and eval stages (a random-weight model answers in 4 tokens): every eval record
    carries its ESConv dialogue's emotion_type and problem_type, and eval reports by them."""
    src = shared_data / "esconv" / "valid.jsonl"
    model = {"name": str(tiny_model), "engine": "hf", "dtype": "float32",
             "sampling": {"temperature": 0.0, "max_tokens": 4}}
    recipe = Recipe.model_validate({
        "run": {"name": "labels", "dir": str(tmp_path), "stages": ["corpus", "pairs", "eval"]},
        "models": {"weak": model, "strong": model},
        "corpus": {"sources": [{"path": str(src), "format": "esconv", "text_from": "situation", "limit": 12}],
                   "per_scene": None, "heldout_fraction": 0.5},
        "eval": {"systems": ["weak", "strong"], "judge": False, "bootstrap": 20, "strata": {"min_posts": 2}},
    })
    assert run_stages(recipe, STAGES) == {"corpus": "ran", "pairs": "ran", "eval": "ran"}
    raw = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:12]]
    corpus = {r["id"]: r for r in StageStore(recipe.run_dir, "corpus").records()}
    for r in corpus.values():
        source = raw[int(r["source_id"].rsplit("-", 1)[1])]
        assert r["emotion"] == source["emotion_type"] and r["scene"] == normalise_scene(source["problem_type"])
        assert r["intent"] is None and r["label_source"] == {"emotion": "dataset", "intent": None}
    pairs = StageStore(recipe.run_dir, "pairs").records()
    assert pairs and all(p["emotion"] == corpus[p["id"]]["emotion"] for p in pairs)
    records = StageStore(recipe.run_dir, "eval").records()
    held = [r for r in corpus.values() if r["split"] == "heldout"]
    assert len(records) == 2 * len(held) >= 4
    for rec in records:
        post = corpus[rec["prompt_id"]]
        assert (rec["emotion"], rec["scene"], rec["intent"]) == (post["emotion"], post["scene"], None)
    summary = json.loads((recipe.run_dir / "eval" / "summary.json").read_text())
    cells = {c["value"]: c["posts"] for c in summary["strata"]["facets"]["emotion"]}
    expected: dict[str, int] = {}
    for r in held:
        expected[r["emotion"]] = expected.get(r["emotion"], 0) + 1
    assert cells == expected and len(cells) >= 2
    assert [(c["value"], c["posts"]) for c in summary["strata"]["facets"]["intent"]] == [("(unlabelled)", len(held))]


def test_corpus_tag_cli_on_the_offline_model(tmp_path, shared_data, offline_model, monkeypatch):
    """`toushi corpus tag` on real ESConv openings (which carry ESConv's emotion): the offline model, decoding
    constrained to the label set, tags every post; the file's own emotion is kept and the tagger is measured
    against it; a rerun answers from the cache."""
    from toushi.cli import app

    lines = (shared_data / "esconv_openings.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    posts = tmp_path / "posts.jsonl"
    posts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "tag"},
        "models": {"strong": {"name": str(offline_model), "engine": "hf", "dtype": "float32", "hf_batch_size": 6}},
        "corpus": {"tagging": {"sampling": {"temperature": 0.0, "max_tokens": 24}}},
    }))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["corpus", "tag", str(posts), "--recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    out = Path(res.stdout.strip().splitlines()[-1])
    assert out == Path("posts.tagged.jsonl")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    labels = label_set("en")
    emotions, intents = {x["label"] for x in labels["emotion"]}, {x["label"] for x in labels["intent"]}
    source = [json.loads(line) for line in lines]
    for row, src in zip(rows, source, strict=True):
        assert row["tags"]["model"].startswith(f"{offline_model}|w=")  # the model as calls key it: weights digest, dtype
        # constrained decoding: every answer is a label of the closed set
        assert row["tags"]["emotion"] in emotions and row["tags"]["intent"] in intents
        assert row["emotion"] == src["emotion"] and row["label_source"] == {"emotion": "dataset", "intent": "tagger"}
        assert row["intent"] == row["tags"]["intent"] and row["text"] == src["text"]
    rep = json.loads(Path("posts.tagged.agreement.json").read_text())
    right = sum(r["tags"]["emotion"] == r["emotion"] for r in rows)
    assert rep["n"] == 6 and rep["correct"] == right and rep["accuracy"] == pytest.approx(right / 6)
    assert rep["gold_field"] == "emotion" and rep["model"].startswith(f"{offline_model}|w=") and rep["invalid"] == 0
    assert sum(map(sum, rep["confusion"])) == 6
    assert "dataset \\ tagger" in Path("posts.tagged.agreement.md").read_text()
    again = CliRunner().invoke(app, ["corpus", "tag", str(posts), "--recipe", str(recipe)])
    assert again.exit_code == 0 and "6 records ('text' tagged), 0 generated" in again.output
    bad = CliRunner().invoke(app, ["corpus", "tag", str(posts), "--recipe", str(recipe), "--field", "nope"])
    assert bad.exit_code == 2 and "no 'nope' text" in bad.output
