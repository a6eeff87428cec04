"""Twins of the GPU recipe's hub models: the real tokenizers, ids, templates and vocabulary sizes, checked against
facts known about the real files (llama.cpp's test vectors, the documented R1 renderings)."""

from __future__ import annotations

import json

import pytest

from toushi.models import MARKER, ModelError, resolve_model
from toushi.twins import twin_for, vocab_test_vectors

EN = "I failed my driving test today, and honestly? I feel stupid."
ZH = "今天驾照考试又没过，感觉自己好笨。你会怎么安慰我？"


def embedding_rows(path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape()[0] for k in f.keys()
                if k.endswith(("embed_tokens.weight", "lm_head.weight"))}


def test_twins_match_real_tokenizer_facts(twins):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    qwen_path, r1_path = twins["qwen2.5-1.5b-instruct"], twins["r1-distill-qwen-7b"]
    # vocabulary and embedding sizes: 151,665 tokens each, 151,936 rows (Qwen2.5-1.5B, R1-1.5B) and 152,064 (R1-7B)
    assert embedding_rows(qwen_path) == {"model.embed_tokens.weight": 151936}  # tied lm_head
    assert embedding_rows(r1_path) == {"model.embed_tokens.weight": 152064, "lm_head.weight": 152064}
    assert embedding_rows(twins["r1-distill-qwen-1.5b"])["lm_head.weight"] == 151936
    for path in twins.values():
        config = AutoConfig.from_pretrained(path)
        assert config.architectures == ["Qwen2ForCausalLM"] and config.head_dim == 64
    assert resolve_model("r1-distill-qwen-7b-twin") == str(r1_path)
    assert twin_for("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B") == "r1-distill-qwen-7b-twin"
    assert twin_for("Qwen/Qwen2.5-1.5B-Instruct") == "qwen2.5-1.5b-instruct-twin" and twin_for("gpt2") is None
    info = json.loads((r1_path / MARKER).read_text())
    assert info["twin_of"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert info["not_real"]["weights"].startswith("random")

    qwen = AutoTokenizer.from_pretrained(qwen_path)
    r1 = AutoTokenizer.from_pretrained(r1_path)
    assert len(qwen) == len(r1) == 151665
    # special tokens: the same ids, other meanings
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token_id) == ("<|im_end|>", 151645, 151643)
    assert qwen.bos_token_id is None
    assert qwen.convert_tokens_to_ids(["<|im_start|>", "<|endoftext|>"]) == [151644, 151643]
    assert (r1.bos_token_id, r1.eos_token_id, r1.pad_token_id) == (151646, 151643, 151643)
    assert r1.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]) == [
        151644, 151645, 151648, 151649]
    assert r1.convert_ids_to_tokens([151643, 151645]) == ["<｜end▁of▁sentence｜>", "<｜Assistant｜>"]
    assert GenerationConfig.from_pretrained(qwen_path).eos_token_id == [151645, 151643]
    assert GenerationConfig.from_pretrained(r1_path).eos_token_id == 151643

    # the BPE: llama.cpp's 46 reference tokenizations, through both tokenizers (R1 adds only its bos)
    vectors = vocab_test_vectors()
    assert len(vectors) == 46
    for text, ids in vectors:
        assert qwen(text, add_special_tokens=False)["input_ids"] == ids, text
        assert r1(text)["input_ids"] == [151646, *ids], text
    assert r1("Hello, world!")["input_ids"] == [151646, 9707, 11, 1879, 0]
    for tok in (qwen, r1):
        for text in (EN, ZH):
            assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    # templates: R1's generation prompt opens the think block; a two-turn chat in each
    turn = [{"role": "user", "content": "2+2?"}]
    assert r1.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False) == [
        151646, 151644, 17, 10, 17, 30, 151645, 151648, 198]
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel low."},
            {"role": "assistant", "content": "<think>\nThey are sad.\n</think>\n\nI'm sorry."},
            {"role": "user", "content": "Thanks."}]
    assert r1.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "<｜begin▁of▁sentence｜>Be kind.<｜User｜>I feel low."
        "<｜Assistant｜>\n\nI'm sorry.<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks.<｜Assistant｜><think>\n")
    assert qwen.apply_chat_template(chat[1:], add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nI feel low.<|im_end|>\n<|im_start|>assistant\n<think>\nThey are sad.\n</think>\n\n"
        "I'm sorry.<|im_end|>\n<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_twin_is_a_clear_error():
    from toushi.twins import make_twin

    with pytest.raises(ModelError, match="no twin named 'llama'; known: qwen2.5-1.5b-instruct"):
        make_twin("llama")


def test_check_prints_r1_qwen_pairs(twins, tmp_path, monkeypatch):
    """`toushi check` on the shipped GPU recipe with its models' twins: the numbers the recipe's comments state,
    read from the real tokenizers; a served adapter trained on another tokenizer is refused."""
    from conftest import make_lora_adapter
    from typer.testing import CliRunner

    from toushi import cli
    from toushi.cli import app

    runs = tmp_path / "runs"
    make_lora_adapter(twins["qwen2.5-1.5b-instruct"], runs / "r1-qwen" / "sft" / "adapter")
    args = ["check", "recipes/r1-qwen-gpu.yaml", "--set", f"run.dir={runs}",
            "--set", "models.strong.name=r1-distill-qwen-7b-twin",
            "--set", "models.student.name=qwen2.5-1.5b-instruct-twin"]
    # wide enough that no table cell wraps: the CLI's console fixed its width when toushi.cli was imported (80
    # where COLUMNS said so then, as in an xdist worker), so COLUMNS given to this invocation alone would not do
    monkeypatch.setattr(cli.out, "_width", 250)
    result = CliRunner().invoke(app, args)
    out = result.output
    assert result.exit_code == 0, out
    assert "distill: student / teacher (strong)" in out and "serve: student / sft adapter" in out
    assert "│ embedding rows      │ 151936" in out and "152064" in out and out.count("151665") >= 2
    assert "151643 <|endoftext|>, 151645 <|im_end|>" in out and "151643 <｜end▁of▁sentence｜>" in out
    assert "special tokens that differ by id: 7 " in out and "151644: '<|im_start|>' vs '<｜User｜>'" in out
    assert "151648: '<|box_start|>' vs '<think>'" in out
    assert "both sliced to the first 151936 rows" in out
    assert "end token 151645 is '<|im_end|>' to the student but '<｜Assistant｜>' to the teacher: left out" in out
    assert out.count("│ template round-trip │ ok") == 2

    make_lora_adapter(twins["r1-distill-qwen-1.5b"], runs / "r1-qwen" / "dpo" / "adapter")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "toushi refuses: the dpo adapter was trained with another tokenizer" in result.output


def test_trl_trains_only_the_answer_on_qwen25s_template(twins, tmp_path):
    """The SFT and DPO sets built from R1's answers, tokenized by TRL's trainers with Qwen2.5's real template and
    tokenizer (the GPU recipe's student): the loss covers the answer and its end of turn, never the prompt or R1's
    reasoning (unless sft.keep_think asks for it); padding is Qwen's <|endoftext|>, out of the loss, and the end
    token <|im_end|> is in it, so the student learns to stop; packed (as the GPU recipe trains), the same."""
    from test_train import train_script
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from toushi.datasets import build_dpo, build_sft
    from toushi.engines import make_completion
    from toushi.training import load_tokenizer

    def answer(raw, **kw):
        return make_completion(raw, finish_reason="stop", prompt_tokens=0, completion_tokens=0, latency_s=0.0,
                               model="m", **kw).to_dict()

    posts = {"zh": ("我考试没过，好难受。", "That sounds heavy. 先歇一会儿吧。"),
             "en": ("I lost my job today and I cannot tell my family.", "That is a lot to carry alone.")}
    # R1's raw output has no opening tag (its template puts <think> in the prompt); the reasoning is split off
    pairs = [{"id": lang, "split": "train", "prompt": post,
              "strong": [answer(f"They feel low, be brief.\n</think>\n\n{reply}", opened_think=True)],
              "weak": [answer("I'm so sorry to hear that.")]} for lang, (post, reply) in posts.items()]
    path = twins["qwen2.5-1.5b-instruct"]
    tok = load_tokenizer(str(path), "qwen2.5-1.5b-instruct-twin", None, "sft.train")
    model = AutoModelForCausalLM.from_pretrained(path)
    system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    rendered = {lang: f"{system}<|im_start|>user\n{post}<|im_end|>\n<|im_start|>assistant\n"
                for lang, (post, _) in posts.items()}
    common = dict(report_to="none", use_cpu=True, max_steps=1, dataset_num_proc=None)

    sft = train_script("sft")  # the scripts' own data functions
    for keep_think, packing in ((False, False), (True, False), (False, True)):  # the GPU recipe packs its SFT
        examples, _ = build_sft(pairs, [], keep_think=keep_think)
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=sft.to_prompt_completion(examples),
                             args=SFTConfig(output_dir=str(tmp_path / "sft"), completion_only_loss=True,
                                            packing=packing, **common))
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        batch = trainer.data_collator(rows)
        think = "<think>\nThey feel low, be brief.\n</think>\n\n" if keep_think else ""
        if packing:  # padding-free: both examples in one row, each one's positions from 0, no pad token
            ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
            assert len(rows) == 1 and batch["position_ids"][0].tolist().count(0) == 2 and tok.pad_token_id not in ids
            learned = tok.decode([i for i, label in zip(ids, labels) if label != -100]).split("<|im_end|>\n")
            assert sorted(learned) == sorted(["", *(reply for _, reply in posts.values())]), learned
            continue
        for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
            lang = next(k for k, (post, _) in posts.items() if post in tok.decode(row["input_ids"]))
            n = len(row["input_ids"])
            assert tok.decode(ids[:n]) == rendered[lang] + think + posts[lang][1] + "<|im_end|>\n"
            learned = [i for i, label in zip(ids, labels) if label != -100]
            assert tok.decode(learned) == think + posts[lang][1] + "<|im_end|>\n", (keep_think, lang)
            assert 151645 in learned  # <|im_end|>: the student learns to end its turn
            assert ids[n:] == [tok.pad_token_id] * (len(ids) - n) and set(labels[n:]) <= {-100}
        assert tok.pad_token_id == 151643 != tok.eos_token_id == 151645
        assert len(set(map(len, batch["input_ids"].tolist()))) == 1 and any(
            len(r["input_ids"]) < batch["input_ids"].shape[1] for r in rows)  # one row was padded

    examples, _ = build_dpo(pairs, [])
    trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=train_script("dpo").to_preference(examples),
                         args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common))
    for row in trainer.train_dataset:
        lang = next(k for k, (post, _) in posts.items() if post in tok.decode(row["prompt_ids"]))
        assert tok.decode(row["prompt_ids"]) == rendered[lang]
        assert tok.decode(row["chosen_ids"]) == posts[lang][1] + "<|im_end|>\n"
        assert tok.decode(row["rejected_ids"]) == "I'm so sorry to hear that.<|im_end|>\n"
