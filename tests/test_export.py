"""Export: merged full model loads in transformers and matches adapter outputs; data formats load with
`datasets` and match the training-set counts; `toushi data inspect` renders and warns."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_datasets import write_run
from typer.testing import CliRunner

from toushi.cli import app
from toushi.export import ExportError, export_data, merge
from toushi.recipe import Recipe, save_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    rd = write_run(root / "runs" / "exp")
    recipe = Recipe.model_validate({"run": {"name": "exp", "dir": str(rd.parent)},
                                    "models": {"student": {"name": "smollm2-135m-instruct"}},
                                    "dpo": {"guided_pairs": True}})
    save_recipe(recipe, rd)
    return rd


def test_merge_matches_adapter_outputs(tmp_path, tiny_model):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # init_lora_weights=False: a nonzero adapter, so merging has something to fold in
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)

    out = merge(adapter, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        m, a, b = merged(ids).logits, fresh(ids).logits, plain(ids).logits
    assert torch.allclose(m, a, atol=1e-4)
    assert (m - b).abs().max() > 1e-3
    with pytest.raises(ExportError, match="no adapter_config.json"):
        merge(tmp_path / "nowhere", tmp_path / "x")


@pytest.mark.parametrize("fmt", ["sharegpt", "llamafactory", "alpaca"])
def test_export_formats_load_with_datasets(run_dir, fmt):
    from datasets import load_dataset

    result = export_data(run_dir, fmt)
    out = run_dir / "export" / fmt
    assert result["sft"] == 11 and result["dpo"] == 34  # guided pairs on: 11 + 11 + 12
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["toushi_dpo"]["ranking"] is True
    for kind, n in (("sft", 11), ("dpo", 34)):
        ds = load_dataset("json", data_files=str(out / info[f"toushi_{kind}"]["file_name"]), split="train")
        assert len(ds) == n
        for column in info[f"toushi_{kind}"]["columns"].values():
            if column != "system" or fmt == "alpaca":
                assert column in ds.column_names, (fmt, kind, column, ds.column_names)
    row = load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")[0]
    if fmt == "sharegpt":
        assert [t["from"] for t in row["conversations"]] == ["human", "gpt"]
    elif fmt == "llamafactory":
        assert [t["role"] for t in row["messages"]] == ["user", "assistant"]
    else:
        assert row["instruction"].startswith("Write one reply") and row["output"]


def test_export_data_cli_and_bad_format(run_dir):
    res = CliRunner().invoke(app, ["export", "data", str(run_dir), "--format", "alpaca"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["export", "data", str(run_dir), "--format", "csv"])
    assert res.exit_code == 2 and "sharegpt, llamafactory, alpaca" in res.output


def test_data_inspect_renders_loss_tokens(run_dir, offline_model, capsys):
    from rich.console import Console

    from toushi.inspect_data import inspect_run

    console = Console(record=True, width=120)
    warnings = inspect_run(run_dir, "dpo", n=2, console=console)
    text = console.export_text()
    assert "loss on" in text and "<|im_start|>assistant" in text
    assert warnings == []  # TRL's continuation rendering: default system prompt only in the prompt
    res = CliRunner().invoke(app, ["data", "inspect", str(run_dir), "--stage", "sft", "--n", "1"])
    assert res.exit_code == 0 and "loss on" in res.output


def test_inspect_warns_on_doubled_bos_and_repeated_system_prompt(offline_model):
    from transformers import AutoTokenizer

    from toushi.inspect_data import render

    tok = AutoTokenizer.from_pretrained(offline_model)
    prompt = [{"role": "user", "content": "I feel alone."}]
    completion = [{"role": "assistant", "content": "<think>plan</think>That sounds hard."}]
    assert render(tok, prompt, [{"role": "assistant", "content": "That sounds hard."}]).warnings == []
    own = tok.chat_template
    # a template that prepends BOS itself although its text already starts with the BOS token
    tok.chat_template = "{{ bos_token }}" + own
    assert any("doubled BOS" in w for w in render(tok, prompt, completion[:1]).warnings)
    # generation prompt that differs from how assistant turns render: the split falls back to rendering
    # the completion alone, which repeats the default system prompt
    tok.chat_template = re.sub(r"\{% if add_generation_prompt %\}.*?\{% endif %\}",
                               "{% if add_generation_prompt %}ASSISTANT:{% endif %}", own, flags=re.DOTALL)
    assert tok.chat_template != own
    warnings = render(tok, prompt, completion).warnings
    assert any("not prefix-preserving" in w for w in warnings)
    assert any("default system prompt" in w for w in warnings)
    assert any("<think>" in w for w in warnings)
    assert not any("<think>" in w for w in render(tok, prompt, completion, keep_think=True).warnings)


def test_recipe_yaml_roundtrip_has_training_fields(tmp_path):
    # fields this stage added are in the saved recipe, so a run dir alone reproduces the training set
    r = Recipe.model_validate({"run": {"name": "x"}})
    dumped = yaml.safe_load(r.to_yaml())
    assert dumped["sft"]["drop_markdown"] is True and dumped["sft"]["train"]["eval_fraction"] == 0.05


def _changed_weights(trained_dir, base_dir) -> int:
    from safetensors.torch import load_file

    trained, base = load_file(f"{trained_dir}/model.safetensors"), load_file(f"{base_dir}/model.safetensors")
    return sum(1 for k, v in trained.items() if k in base and not v.equal(base[k]))


def test_trl_cli_trains_on_exported_sets(run_dir, tiny_model, tmp_path):
    """`trl sft` / `trl dpo` (TRL's own command line, as the `trl` script runs it) train a step on the exported
    files, found through the dataset card's configs."""
    from trl.cli.main import main as trl_main

    result = export_data(run_dir, "trl", tmp_path / "trl")
    assert result["sft"] == 11 and result["dpo"] == 34
    row = json.loads((tmp_path / "trl" / "dpo.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    common = ["--model_name_or_path", str(tiny_model), "--dataset_name", str(tmp_path / "trl"), "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--max_length", "256", "--learning_rate", "1e-3",
              "--bf16", "false", "--report_to", "none", "--save_strategy", "no"]
    for kind in ("sft", "dpo"):
        out = tmp_path / f"trained-{kind}"
        assert trl_main([kind, *common, "--dataset_config", kind, "--output_dir", str(out)]) in (0, None)
        assert _changed_weights(out, tiny_model) > 0, kind


def _parity_run(root, offline_model, lora_adapter):
    """A run with held-out prompts, a vLLM student on this CPU and an SFT adapter."""
    import shutil

    from conftest import cpu_vllm_spec

    rd = write_run(root / "runs" / "par")
    student = cpu_vllm_spec(str(offline_model)).model_dump(mode="json")
    recipe = Recipe.model_validate({"run": {"name": "par", "dir": str(rd.parent)}, "models": {"student": student}})
    save_recipe(recipe, rd)
    shutil.copytree(lora_adapter, rd / "sft" / "adapter")
    return rd


def test_merge_parity_check_catches_mismatch(tmp_path, offline_model, lora_adapter, monkeypatch):
    import shutil

    import toushi.export as export

    rd = _parity_run(tmp_path, offline_model, lora_adapter)
    args = ["export", "merge", str(rd), "--stage", "sft", "--prompts", "2", "--max-tokens", "16"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    merged = rd / "sft" / "merged"
    report = json.loads((merged / "parity.json").read_text())
    assert report["ok"] and set(report["backends"]) == {"vllm", "transformers"}
    assert report["prompt_source"] == "held-out prompts of the run" and len(report["prompts"]) == 2
    assert all(b["mismatch"] == 0 and b["same"] + b["noise"] == 2 for b in report["backends"].values())
    assert "Export parity" in (merged / "README.md").read_text()

    # a deliberately wrong merge: the adapter folded in at 4x its scale (lora_alpha 4x) must fail the check
    scaled = tmp_path / "scaled"
    shutil.copytree(lora_adapter, scaled)
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 4
    (scaled / "adapter_config.json").write_text(json.dumps(cfg))
    right_merge = export.merge
    monkeypatch.setattr(export, "merge", lambda adapter, out, **kw: right_merge(scaled, out, **kw))
    res = CliRunner().invoke(app, [*args, "--no-vllm", "--out", str(tmp_path / "wrong")])
    assert res.exit_code == 2 and "answers differently from its adapter" in res.output, res.output
    report = json.loads((tmp_path / "wrong" / "parity.json").read_text())
    assert not report["ok"] and report["backends"]["transformers"]["mismatch"] >= 1
    assert all(i["gap_nats"] > report["tolerance_nats"] for i in report["backends"]["transformers"]["items"]
               if i["verdict"] == "mismatch")
    res = CliRunner().invoke(app, [*args, "--no-vllm", "--out", str(tmp_path / "wrong"), "--allow-mismatch"])
    assert res.exit_code == 0 and "parity mismatch kept" in res.output, res.output
    assert "mismatched" in (tmp_path / "wrong" / "README.md").read_text()


def test_gguf_export_parity(tmp_path, tiny_model):
    """llama.cpp's converter writes the merged student as GGUF; read back through transformers' GGUF loader it
    answers as the merged model does; the Modelfile and card come with it."""
    from conftest import make_lora_adapter
    from gguf import GGUFReader

    rd = write_run(tmp_path / "runs" / "gg")
    save_recipe(Recipe.model_validate({"run": {"name": "gg", "dir": str(rd.parent)},
                                       "models": {"student": {"name": str(tiny_model), "engine": "hf"}},
                                       "corpus": {"sources": [{"path": "data/venting_en.jsonl"}]}}), rd)
    adapter = make_lora_adapter(tiny_model, rd / "sft" / "adapter", r=4, std=0.5)
    merge(adapter, rd / "sft" / "merged")
    res = CliRunner().invoke(app, ["export", "gguf", str(rd), "--outtype", "f16", "--prompts", "2",
                                   "--max-tokens", "16"])
    assert res.exit_code == 0, res.output
    out = rd / "sft" / "gguf"
    gguf_file = out / "gg-sft-f16.gguf"
    fields = GGUFReader(gguf_file).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert "<|im_start|>" in bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    report = json.loads((out / "parity.json").read_text())
    assert report["ok"] and report["outtype"] == "f16" and len(report["prompts"]) == 2
    (backend,) = report["backends"].values()
    assert backend["same"] + backend["noise"] == 2 and backend["mismatch"] == 0
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./gg-sft-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and "SYSTEM" in modelfile  # SmolLM2's default system prompt
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "GGUF (f16)" in card and "LoRA r=4, alpha=8" in card
    assert "Apache-2.0 like the project" in card


def _cards_run(root):
    """A run whose corpus names ESConv, the team's posts, SMILECHAT and a file toushi does not know, with an
    eval summary (one refusal among the sft answers) and a pairs answer cut off at the token limit."""
    from toushi.eval.evaluate import answer_metrics, summarise
    from toushi.store import StageStore

    rd = write_run(root / "runs" / "cards")
    pairs = StageStore(rd, "pairs")
    recs = pairs.records()
    recs[0]["strong"][0]["finish_reason"] = "length"
    (rd / "pairs" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sources = [{"path": "../shared/data/esconv_openings.jsonl"}, {"path": "data/venting_en.jsonl"},
               {"path": "../shared/data/smile_openings.jsonl"}, {"path": "mine.csv", "format": "csv"}]
    save_recipe(Recipe.model_validate({"run": {"name": "cards", "dir": str(rd.parent)},
                                       "models": {"student": {"name": "smollm2-135m-instruct"}},
                                       "corpus": {"sources": sources}}), rd)
    texts = {"weak": ["Drink some tea.", "Cheer up."],
             "sft": ["That sounds exhausting; you deserve rest.", "I'm sorry, but I can't help with that."]}
    answers = [{"system": s, "prompt_id": f"h{i}", "metrics": answer_metrics("I can't sleep.", t)}
               for s, ts in texts.items() for i, t in enumerate(ts)]
    summary = summarise(answers, [], None, n_boot=20, seed=0)
    (rd / "eval").mkdir()
    (rd / "eval" / "summary.json").write_text(json.dumps(summary))
    return rd


def test_cards_name_licences(tmp_path, lora_adapter):
    import shutil

    from huggingface_hub import DatasetCard, ModelCard

    from toushi.cards import write_model_card

    rd = _cards_run(tmp_path)
    shutil.copytree(lora_adapter, rd / "sft" / "adapter")
    path = write_model_card(tmp_path / "model", rd, "sft", "Qwen/Qwen2.5-0.5B-Instruct", artifact="merged model")
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and card.data.license == "cc-by-nc-4.0"
    text = card.text
    assert "ESConv (Liu et al., ACL 2021)" in text and "CC BY-NC 4.0" in text and "must not be used commercially" in text
    assert "SMILECHAT" in text and "CC0 1.0" in text and "Apache-2.0 like the project" in text
    assert "mine.csv" in text and "licence unknown to toushi" in text
    assert "not a therapist" in text and "Crisis posts" in text
    assert "LoRA r=32, alpha=64" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| sft ")
            or line.startswith("| weak ")}
    assert rows["sft"].split("|")[2].strip() == "50%" and rows["weak"].split("|")[2].strip() == "0%"  # refusal
    assert "strong 6% (1/16)" in text  # truncation of the training answers
    assert "name: cards" in text  # the recipe

    export_data(rd, "llamafactory", tmp_path / "data")
    dcard = DatasetCard.load(tmp_path / "data" / "README.md")
    assert sorted(dcard.data.license) == ["apache-2.0", "cc-by-nc-4.0", "cc0-1.0", "unknown"]
    assert [c["config_name"] for c in dcard.data.configs] == ["sft", "dpo"]
    assert "ESConv" in dcard.text and "must not be used commercially" in dcard.text and "crisis posts" in dcard.text


class HubStandIn:
    """The few Hub API routes huggingface_hub's create_repo + upload_folder call, served on loopback by
    uvicorn (Starlette): repo creation, README metadata validation, preupload (every file a regular upload) and
    the NDJSON commit. It keeps what was committed and the token each request carried."""

    def __init__(self):
        import base64

        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.repos, self.files, self.tokens = {}, {}, set()

        async def create(request: Request):
            body = await request.json()
            self.tokens.add(request.headers.get("authorization"))
            repo = f"{body['organization']}/{body['name']}"
            self.repos[repo] = body
            return JSONResponse({"url": f"{self.url}/{body['type']}s/{repo}", "name": repo})

        async def validate_yaml(request: Request):
            return JSONResponse({"errors": [], "warnings": []})

        async def preupload(request: Request):
            body = await request.json()
            return JSONResponse({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in body["files"]]})

        async def commit(request: Request):
            self.tokens.add(request.headers.get("authorization"))
            repo = f"{request.path_params['org']}/{request.path_params['name']}"
            for line in (await request.body()).decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[(repo, item["value"]["path"])] = base64.b64decode(item["value"]["content"])
            return JSONResponse({"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})

        self.app = Starlette(routes=[
            Route("/api/repos/create", create, methods=["POST"]),
            Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
            Route("/api/{kind}/{org}/{name}/preupload/{rev}", preupload, methods=["POST"]),
            Route("/api/{kind}/{org}/{name}/commit/{rev}", commit, methods=["POST"]),
        ])

    def __enter__(self):
        import threading
        import time

        import uvicorn
        from conftest import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_push_to_hub_uploads_export_to_stand_in(tmp_path, run_dir, monkeypatch):
    """`toushi export data --push-to-hub` creates a private dataset repo and commits the files with the card; it
    refuses without a token. The Hub cannot be reached here: huggingface_hub talks to a local stand-in."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # loopback only
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login
    args = ["export", "data", str(run_dir), "--format", "trl", "--out", str(tmp_path / "trl"),
            "--push-to-hub", "me/toushi-sets"]
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "no Hugging Face token" in res.output and not hub.repos
        monkeypatch.setenv("HF_TOKEN", "hf_standin")
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert hub.repos["me/toushi-sets"]["type"] == "dataset" and hub.repos["me/toushi-sets"]["visibility"] == "private"
    assert hub.tokens == {"Bearer hf_standin"}
    uploaded = {path: data for (repo, path), data in hub.files.items()}
    assert set(uploaded) == {"README.md", "sft.jsonl", "dpo.jsonl"}
    assert uploaded["dpo.jsonl"] == (tmp_path / "trl" / "dpo.jsonl").read_bytes()
    assert b"config_name: dpo" in uploaded["README.md"]
