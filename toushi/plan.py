"""`toushi plan RECIPE`: what each training stage and each vLLM engine of a recipe needs in memory, by arithmetic.

From each model's shape (its config.json, or the real shape of a hub model toushi has a twin of), so it runs
before a GPU is rented and loads no weights. Per item, in GiB:
- weights: the exact parameter count x bytes per parameter (bf16/fp16 2, fp32 4). QLoRA keeps the decoder's
  linear layers in nf4, half a byte a weight plus 1/64 of a byte for the double-quantised block scales; the
  embeddings and the head stay in the compute dtype. QLoRA also gets an allowance of one compute-dtype copy of
  those linear weights: on the H200 its peak was 10 GiB above bf16 LoRA's at the same batch (7B, batch 4)
  although its weights were 9 GiB smaller (an allowance for what bitsandbytes dequantises, not a traced cause);
- adapter + AdamW: r x (in + out) parameters per adapted linear layer, kept in fp32 with their gradient and
  AdamW's two moments, 16 bytes a parameter;
- activations: one micro-batch with every row full (per_device_train_batch_size x the longest row; DPO's rows
  are a chosen and a rejected answer). What a frozen base's decoder layer keeps for the backward pass, in the
  compute dtype, per token: its two norms' inputs and outputs (4h), q, k and v (2H + 2kv), the attention output
  (H), the MLP's gate, up, activation and product (4I); LoRA's dropout keeps a dropped copy of every adapted
  layer's input when dropout > 0. With gradient checkpointing a layer keeps only its input (h), and one layer's
  activations are rebuilt at a time;
- logits: tokens x vocab x 10 bytes (the logits in the compute dtype, their fp32 copy for the loss and its
  gradient); 0 with use_liger_kernel, whose fused linear cross-entropy never builds them;
- in the trainer's process besides: distill's teacher (weights, and its logits for the micro-batch, no
  gradient), and the colocated vLLM of GRPO and distill on a GPU (TRL's vllm_gpu_memory_utilization, 0.3 of the
  card);
- a vLLM engine: weights plus its KV cache (kv_cache_gb; else it claims gpu_memory_utilization of the card, and
  the cache is what the weights leave of that share).
Estimates: docs/benchmarks.md sets them beside the peaks measured on an H200. The CUDA context (about 0.5 GiB)
and the allocator's fragmentation are not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from toushi.errors import ToushiError

GIB = 1024**3
TRL_COLOCATE_SHARE = 0.3  # TRL's GRPOConfig.vllm_gpu_memory_utilization default, which train/grpo.py and distill keep
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINING_STAGES = ("sft", "dpo", "grpo", "distill", "selftrain")
ROLES = ("weak", "strong", "student", "judge")
FIT_SHARE = 0.9  # of a card a training stage may fill: what the `auto` settings (QLoRA, checkpointing) decide by


class PlanError(ToushiError, ValueError):
    """A model's shape cannot be read, or the recipe cannot fit its card."""


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes (Llama / Qwen2 layout: q, k, v, o and a gated MLP per layer)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=hidden, intermediate=c["intermediate_size"],
                   layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or hidden // heads, tied=bool(c.get("tie_word_embeddings", False)),
                   # Qwen2 always has q/k/v biases (its config has no field for it); Llama-likes say so
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """The decoder layers' linear weights (what QLoRA quantises), biases excluded."""
        return self.layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer_rest = bias + 2 * self.hidden  # q/k/v biases, two RMSNorm weights
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params + self.layers * per_layer_rest + embeddings + self.hidden  # + the final norm

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        names = LINEARS if targets == "all-linear" else [t for t in targets if t in LINEARS]
        dims = self.linear_dims()
        return self.layers * sum(r * (dims[n][0] + dims[n][1]) for n in names)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def shape_of(name: str) -> Shape:
    """The shape of a recipe's model: a twin's real shape for the hub models toushi has twins of (no download),
    else the config.json of a local directory or a cached toushi model."""
    from toushi.twins import twin_of

    twin = twin_of(name)  # a twin's own cached directory (toy width) is read from its config.json below
    if twin is not None:
        return Shape.from_config({"model_type": "qwen2", **twin.config, **twin.shape})
    from toushi.models import ModelError, resolve_model

    try:
        path = Path(resolve_model(name))
    except ModelError as e:
        raise PlanError(f"{name}: {e}") from None
    config = path / "config.json"
    if not config.is_file():
        raise PlanError(f"{name}: no config.json to read its shape from (offline, a hub id must be in the HF cache "
                        "or be one toushi has a twin of)")
    try:
        return Shape.from_config(json.loads(config.read_text(encoding="utf-8")))
    except KeyError as e:
        raise PlanError(f"{config}: no {e.args[0]}: the plan reads decoder-only models of the Llama / Qwen2 "
                        "layout") from None


def dtype_bytes(dtype: str, bf16: bool) -> int:
    if dtype in ("bfloat16", "float16"):
        return 2
    if dtype == "float32":
        return 4
    return 2 if bf16 else 4  # auto: the training stage's compute dtype


@dataclass
class Item:
    """One row of the plan: a training stage or an engine, its parts in bytes."""

    name: str
    parts: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def activation_bytes_per_token(s: Shape, compute_bytes: int, lora_dropout: float, targets, checkpointing: bool) -> float:
    """What one token costs the backward pass across the decoder (see the module docstring)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = 4 * s.hidden + 3 * q + 2 * kv + 4 * s.intermediate
    if lora_dropout > 0:  # a dropped copy of each adapted layer's input
        names = LINEARS if targets == "all-linear" else [t for t in targets if t in LINEARS]
        per_layer += sum(s.linear_dims()[n][0] for n in names)
    if checkpointing:  # each layer's input kept; one layer rebuilt at a time
        return compute_bytes * (s.layers * s.hidden + per_layer)
    return compute_bytes * s.layers * per_layer


def training_item(stage: str, section, student: Shape, student_dtype: str, teacher: Shape | None = None,
                  teacher_dtype: str = "auto", colocated_bytes: float = 0.0, checkpointing: bool | None = None
                  ) -> Item:
    """The trainer's process of one stage: weights, adapter + optimizer, activations and logits of a micro-batch
    (checkpointing: None as the section says; ``auto`` there counts as on, the smaller of the two)."""
    t, lora = section.train, section.lora
    if checkpointing is None:
        checkpointing = t.gradient_checkpointing is not False
    bf16 = t.bf16 is not False  # a GPU plan: bf16 unless the recipe turns it off
    compute = 2 if bf16 else 4
    wbytes = dtype_bytes(student_dtype, bf16)
    qlora = {}
    if lora.qlora is True:  # auto is decided before (resolve_auto)
        rest = student.params - student.linear_params
        weights = student.linear_params * (0.5 + 1 / 64) + rest * compute
        qlora = {"dequantised": student.linear_params * compute}
    else:
        weights = student.params * wbytes
    rows = t.per_device_train_batch_size
    if stage == "dpo":
        rows *= 2  # chosen and rejected
    if stage in ("grpo", "distill"):  # the prompt (up to train.max_length) and a sampled completion
        row_len = t.max_length + section.max_completion_length
    else:
        row_len = t.max_length
    tokens = rows * row_len
    parts = {
        "weights": weights,
        "adapter+adamw": 16 * student.lora_params(lora.r, lora.target_modules),
        "activations": tokens * activation_bytes_per_token(student, compute, lora.dropout, lora.target_modules,
                                                           checkpointing),
        "logits": 0.0 if t.use_liger_kernel else tokens * student.vocab * 10,
        **qlora,
    }
    notes = [f"{rows} rows x {row_len} tokens"]
    if teacher is not None:
        parts["teacher"] = teacher.params * dtype_bytes(teacher_dtype, bf16) + tokens * teacher.vocab * (compute + 4)
    if colocated_bytes:
        parts["colocated vLLM"] = colocated_bytes
        notes.append(f"TRL's colocated vLLM claims {TRL_COLOCATE_SHARE:.0%} of the card")
    return Item(stage, parts, notes)


def engine_item(role: str, spec, shape: Shape, card_bytes: float | None) -> Item:
    """A vLLM engine: its weights and the KV cache it reserves."""
    weights = shape.params * dtype_bytes(spec.dtype, True)
    if spec.kv_cache_gb is not None:
        return Item(f"{role} engine", {"weights": weights, "kv cache": spec.kv_cache_gb * GIB},
                    [f"kv_cache_gb {spec.kv_cache_gb}"])
    if card_bytes is None:
        return Item(f"{role} engine", {"weights": weights}, ["KV cache: gpu_memory_utilization of a card"])
    claim = spec.gpu_memory_utilization * card_bytes
    tokens = max(claim - weights, 0) / shape.kv_bytes_per_token(dtype_bytes(spec.dtype, True))
    return Item(f"{role} engine", {"weights": weights, "kv cache": max(claim - weights, 0.0)},
                [f"gpu_memory_utilization {spec.gpu_memory_utilization}: {int(tokens):,} tokens of KV cache"])


def engine_bytes(spec, card_bytes: float | None) -> float | None:
    """What a vLLM engine of ``spec`` holds (None when its shape cannot be read): the pool asks this."""
    try:
        return engine_item("", spec, shape_of(spec.name), card_bytes).total
    except PlanError:
        return None


def stage_item(recipe, stage: str, card_bytes: float, on_gpu: bool, shape=shape_of,
               checkpointing: bool | None = None) -> Item:
    """The trainer's process of one training stage of ``recipe`` (checkpointing: as the recipe says, or forced)."""
    models, section = recipe.models, getattr(recipe, stage)
    student = models.student
    teacher = teacher_dtype = None
    if stage == "distill":
        spec = student if section.teacher == "guided" else models.strong
        teacher, teacher_dtype = shape(spec.name), spec.dtype
    colocated = 0.0
    if stage in ("grpo", "distill") and on_gpu and section.use_vllm is not False:
        colocated = TRL_COLOCATE_SHARE * card_bytes
    return training_item(stage, section, shape(student.name), student.dtype, teacher, teacher_dtype or "auto",
                         colocated, checkpointing)


def resolve_auto(recipe, stage: str, card_bytes: float, on_gpu: bool) -> list[str]:
    """Decide a training stage's ``auto`` memory settings for this card, in ``recipe`` itself: QLoRA first (then
    checkpointing knows the weights it trains on), then the micro-batch split with checkpointing where
    ``largest_micro_batch`` asks for it, else checkpointing alone. One line per decision, for the log and the plan."""
    section, notes = getattr(recipe, stage), []
    if section.lora.qlora == "auto":
        section.lora.qlora, why = qlora_needed(recipe, stage, card_bytes, on_gpu)
        notes.append(f"qlora (auto) {why}")
    if section.train.largest_micro_batch:  # decides checkpointing's `auto` with it
        notes += largest_micro_batch(recipe, stage, card_bytes, on_gpu)
    elif section.train.gradient_checkpointing == "auto":
        section.train.gradient_checkpointing, why = checkpointing_needed(recipe, stage, card_bytes, on_gpu)
        notes.append(f"gradient checkpointing (auto) {why}")
    return notes


def share_of(card_bytes: float) -> str:
    return f"{FIT_SHARE:.0%} of the {card_bytes / GIB:.0f} GiB card ({FIT_SHARE * card_bytes / GIB:.1f})"


def over_share(recipe, stage: str, card_bytes: float, on_gpu: bool, checkpointing: bool, what: str
               ) -> tuple[bool, str]:
    """Whether the stage (checkpointing as given) is over FIT_SHARE of the card, and why in one line ("on: ..." /
    "off: ...", ``what`` naming the setting weighed). A shape the plan cannot read counts as over: the safe side."""
    try:
        need = stage_item(recipe, stage, card_bytes, on_gpu, checkpointing=checkpointing).total
    except PlanError as e:
        return True, f"on: the plan cannot read a model's shape ({e})"
    share = share_of(card_bytes)
    if need <= FIT_SHARE * card_bytes:
        return False, f"off: {need / GIB:.1f} GiB {what} fits {share}"
    return True, f"on: {need / GIB:.1f} GiB {what} is over {share}"


def qlora_needed(recipe, stage: str, card_bytes: float, on_gpu: bool) -> tuple[bool, str]:
    """``lora.qlora: auto``: the base in 4-bit only when, in bf16, the stage does not fit FIT_SHARE of the card
    even with gradient checkpointing. bf16 LoRA is the faster of the two, and on the H200 (7B, batch 4) it also
    peaked lower than QLoRA (docs/benchmarks.md). Never on a CPU: bitsandbytes' 4-bit training is CUDA's."""
    if not on_gpu:
        return False, "off: no CUDA device"
    bf16 = recipe.model_copy(deep=True)
    getattr(bf16, stage).lora.qlora = False
    t = getattr(bf16, stage).train
    if t.largest_micro_batch:  # the smallest split it may take: one row a micro-batch
        t.per_device_train_batch_size, t.gradient_accumulation_steps = 1, examples_per_step(t)
    return over_share(bf16, stage, card_bytes, on_gpu, True, "in bf16")


def checkpointing_needed(recipe, stage: str, card_bytes: float, on_gpu: bool) -> tuple[bool, str]:
    """``gradient_checkpointing: auto``: on only when the stage's micro-batch, every row full, does not fit
    FIT_SHARE of the card without it (the plan's estimates are within about 1 % of the measured peaks for packed
    rows and above them otherwise, docs/benchmarks.md; the share leaves room for the CUDA context and the
    allocator)."""
    return over_share(recipe, stage, card_bytes, on_gpu, False, "without it")


def examples_per_step(train) -> int:
    """The examples of one optimizer step on one device: what ``largest_micro_batch`` keeps."""
    return train.per_device_train_batch_size * train.gradient_accumulation_steps


def largest_micro_batch(recipe, stage: str, card_bytes: float, on_gpu: bool) -> list[str]:
    """``largest_micro_batch``: the stage's step re-split into the largest micro-batch that divides its examples and
    fits FIT_SHARE of the card, decided in ``recipe``. With ``gradient_checkpointing: auto``, checkpointing goes on
    only where no micro-batch fits without it: a smaller micro-batch costs less than recomputing every layer (a
    third more compute), as long as one fits. Where none fits, one row a micro-batch (the plan says it does not
    fit). One line per decision."""
    t = getattr(recipe, stage).train
    examples, auto = examples_per_step(t), t.gradient_checkpointing == "auto"
    given, share = (t.per_device_train_batch_size, t.gradient_accumulation_steps), share_of(card_bytes)
    for checkpointing in ((False, True) if auto else (t.gradient_checkpointing,)):
        for micro in (d for d in range(examples, 0, -1) if examples % d == 0):
            t.per_device_train_batch_size, t.gradient_accumulation_steps = micro, examples // micro
            try:
                need = stage_item(recipe, stage, card_bytes, on_gpu, checkpointing=checkpointing).total
            except PlanError as e:  # the recipe's own split, and checkpointing on: the safe side
                t.per_device_train_batch_size, t.gradient_accumulation_steps = given
                if auto:
                    t.gradient_checkpointing = True
                return [f"micro-batch (largest) kept at {given[0]} x {given[1]}"
                        + (", gradient checkpointing (auto) on" if auto else "")
                        + f": the plan cannot read a model's shape ({e})"]
            if need <= FIT_SHARE * card_bytes:
                notes = [f"micro-batch (largest) {micro} x {examples // micro} accumulated: {need / GIB:.1f} GiB "
                         f"{'with' if checkpointing else 'without'} gradient checkpointing fits {share}"]
                if auto:
                    t.gradient_checkpointing = checkpointing
                    notes.append("gradient checkpointing (auto) " + (
                        "on: no micro-batch fits without it" if checkpointing else "off: a micro-batch fits without it"))
                return notes
    t.per_device_train_batch_size, t.gradient_accumulation_steps = 1, examples
    if auto:
        t.gradient_checkpointing = True
    return [f"micro-batch (largest) 1 x {examples} accumulated" + (", gradient checkpointing (auto) on" if auto else "")
            + f": not even one row fits {share}"]


def plan(recipe, card_bytes: float, on_gpu: bool = True) -> tuple[list[Item], list[str]]:
    """The recipe's items and what cannot fit on a card of ``card_bytes`` (one line each)."""
    items, problems = [], []
    shapes: dict[str, Shape] = {}
    recipe = recipe.model_copy(deep=True)  # its `auto` settings are decided below, on this card

    def shape(name: str) -> Shape:
        if name not in shapes:
            shapes[name] = shape_of(name)
        return shapes[name]

    models = recipe.models
    for role in ROLES:
        spec = getattr(models, role)
        if spec is None or spec.engine != "vllm" or spec.base_url:
            continue
        item = engine_item(role, spec, shape(spec.name), card_bytes if on_gpu else None)
        items.append(item)
        if spec.kv_cache_gb is None and on_gpu and item.parts["kv cache"] <= 0:
            problems.append(f"models.{role}: {spec.name}'s weights ({item.parts['weights'] / GIB:.1f} GiB) fill its "
                            f"gpu_memory_utilization {spec.gpu_memory_utilization} of a {card_bytes / GIB:.0f} GiB "
                            "card: no room for a KV cache (raise it, or use a bigger card)")
        elif item.total > card_bytes:
            problems.append(f"models.{role}: {item.total / GIB:.1f} GiB does not fit the {card_bytes / GIB:.0f} GiB card")
    stages = set(recipe.run.stages)
    for stage in TRAINING_STAGES:
        if stage not in stages or models.student is None:
            continue
        decided = resolve_auto(recipe, stage, card_bytes, on_gpu)  # what the trainer will decide
        item = stage_item(recipe, stage, card_bytes, on_gpu, shape)
        item.notes += decided
        items.append(item)
        if item.total > card_bytes:
            biggest = max(item.parts, key=item.parts.get)
            problems.append(f"{stage}: {item.total / GIB:.1f} GiB with every row full ({item.notes[0]}) does not fit "
                            f"the {card_bytes / GIB:.0f} GiB card (most of it {biggest}: "
                            f"{item.parts[biggest] / GIB:.1f} GiB)")
    return items, problems


def card_memory() -> tuple[float, bool, str]:
    """(bytes, is a GPU, what it is) of the card this machine would run on: the first CUDA device, else RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), True, props.name
    import psutil

    return float(psutil.virtual_memory().total), False, "this machine's RAM (no CUDA device)"
