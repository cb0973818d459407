"""Memory planner: will a run fit, before any weight is loaded?

From a model's config (its shapes, read off a weightless skeleton) and a RunConfig, estimate peak training
memory as a breakdown: base weights, LoRA weights, their gradients, optimizer states, activations, the
logits/loss buffers and runtime overhead. `suggestions` offers the usual fixes (QLoRA, smaller batch with
more accumulation, shorter cutoff, checkpointing, lower rank), each with its new estimate.

Everything here is arithmetic on shapes: `plan_memory` is pure given `ModelShapes`; only `model_shapes`
builds a (meta-device) skeleton, and only `device_free_memory` looks at the machine. No gradio.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from studio.core.config import ConfigError, RunConfig
from studio.core.problems import Problem
from studio.model.targets import (
    LinearShape,
    adapted_layers,
    linear_modules,
    lora_param_count,
    output_layer_names,
    target_problem,
    targetable_names,
)

GB = 1e9  # the published 7B figures (14-18 GB, 5-8 GB) are decimal gigabytes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# bitsandbytes 4-bit (NF4/FP4): two weights per byte, one absmax per 64-weight block. The absmax is fp32,
# or with double quantization 8-bit plus one fp32 second-level scale per 256 blocks (QLoRA paper, sec. 3).
BNB4_BLOCK = 64
BNB4_DQ_BLOCK = 256
# LLM.int8(): int8 weights plus one fp32 scale per output row.
INT8_ROW_SCALE_BYTES = 4
# bnb 8-bit optimizers: two uint8 states plus one fp32 absmax per 256-element block each.
OPT8_BLOCK = 256

# Runtime overhead on CPU: what a training process holds beyond tensors (peft/accelerate/bitsandbytes
# imports, the Trainer, tokenizer, data, allocator slack), above the RSS right after `import torch,
# transformers`. Measured by `python -m bench` as the "runtime-floor" config (a 2-layer, hidden-64 Llama
# whose weights are a few MB): its measured peak minus the planner's own tensor items (mostly its logits)
# was 313 MiB on a 2-core x86 CPU, torch 2.13, under tcmalloc as the worker runs (studio/core/allocator.py)
# (bench/results/memory-cpu.json, "implied_runtime_bytes").
CPU_RUNTIME_BYTES = 310 * 2**20
# CUDA context plus cuBLAS workspace, counted by nvidia-smi though not by max_memory_allocated:
# typically 0.5-1 GB depending on GPU and driver.
CUDA_CONTEXT_BYTES = int(0.75 * GB)


class PlanError(ConfigError):
    """A run config that cannot be planned for this model; `problems` lists every reason."""


@dataclass(frozen=True)
class ModelShapes:
    """What the planner needs from a model, read once from its weightless skeleton."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int | None
    linears: tuple[LinearShape, ...]
    other_params: int  # every parameter not in a linear layer (embeddings, norms), shared ones once
    eager_attention: bool  # eager attention keeps the heads x seq x seq score matrices for backward
    file_dtype: str | None = None  # the dtype the weights are stored in on disk (config.json "dtype"), if known

    @property
    def linear_names(self) -> list[str]:
        return targetable_names(self.linears)

    @property
    def total_params(self) -> int:
        linear = sum(x.out_features * x.in_features + (x.out_features if x.has_bias else 0) for x in self.linears)
        return linear + self.other_params


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    why: str


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    items: tuple[Item, ...]
    trainable_params: int
    tokens_per_step: int  # batch x cutoff: the worst case the plan assumes
    # What loading adds on top of the runtime overhead, before training starts (empty: loading peaks lower).
    load_items: tuple[Item, ...] = ()

    @property
    def training_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def loading_bytes(self) -> int:
        """Peak while the weights load: the load items plus the runtime overhead already there."""
        if not self.load_items:
            return 0
        overhead = sum(i.bytes for i in self.items if i.name == "overhead")
        return sum(i.bytes for i in self.load_items) + overhead

    @property
    def total_bytes(self) -> int:
        """The peak: loading and training happen one after the other, so the larger of the two."""
        return max(self.training_bytes, self.loading_bytes)

    def item(self, name: str) -> Item:
        return next(i for i in (*self.items, *self.load_items) if i.name == name)

    def fits(self, available_bytes: int | None) -> bool | None:
        """None when the free memory is unknown."""
        return None if available_bytes is None else self.total_bytes <= available_bytes

    def describe(self) -> str:
        width = max(len(i.name) for i in self.items)
        width = max([width, 14, *(len(i.name) for i in self.load_items)])
        rows = [f"{i.name:<{width}}  {fmt_bytes(i.bytes):>9}  {i.why}" for i in self.items]
        if self.load_items:
            rows.append(f"{'training peak':<{width}}  {fmt_bytes(self.training_bytes):>9}")
            rows += [f"{i.name:<{width}}  {fmt_bytes(i.bytes):>9}  {i.why}" for i in self.load_items]
            rows.append(f"{'loading peak':<{width}}  {fmt_bytes(self.loading_bytes):>9}  load items + overhead")
        rows.append(f"{'total':<{width}}  {fmt_bytes(self.total_bytes):>9}  peak estimate on {self.device}")
        return "\n".join(rows)


@dataclass(frozen=True)
class Suggestion:
    change: str
    config: RunConfig
    plan: MemoryPlan


def fmt_bytes(n: int | float) -> str:
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.0f} MB"


# -- the model's shapes ---------------------------------------------------------------------------


def model_shapes(model_config: Any) -> ModelShapes:
    """Shapes from a meta-device skeleton (accelerate.init_empty_weights): no weights are loaded."""
    from studio.model.loading import build_skeleton

    skeleton = build_skeleton(model_config)
    return shapes_from_skeleton(skeleton, model_config, output_layer_names(skeleton))


def shapes_from_skeleton(skeleton: Any, cfg: Any, output_names: set[str]) -> ModelShapes:
    linears, kept_ids = [], set()
    for name, module in linear_modules(skeleton):
        if _is_tied(skeleton, module):
            continue  # a tied LM head is the embedding matrix: counted once, with the other parameters
        out_f, in_f = module.weight.shape[0], module.weight.shape[1]
        short = name.split(".")[-1]
        has_bias = getattr(module, "bias", None) is not None
        linears.append(LinearShape(short, int(out_f), int(in_f), has_bias, short in output_names))
        kept_ids |= {id(p) for p in module.parameters(recurse=False)}
    # parameters() yields a shared tensor once, so tied embeddings are not counted twice.
    other = sum(p.numel() for p in skeleton.parameters() if id(p) not in kept_ids)
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    hidden = int(getattr(text, "hidden_size", 0))
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    return ModelShapes(
        model_type=str(getattr(cfg, "model_type", "?")),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
        layers=int(getattr(text, "num_hidden_layers", 0)),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", heads) or heads),
        vocab=int(getattr(text, "vocab_size", 0)),
        max_positions=getattr(text, "max_position_embeddings", None),
        linears=tuple(linears),
        other_params=int(other),
        eager_attention=getattr(cfg, "_attn_implementation", None) == "eager",
        file_dtype=_dtype_name(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)),
    )


def _dtype_name(dtype: Any) -> str | None:
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name)


def _is_tied(skeleton: Any, module: Any) -> bool:
    get_in = getattr(skeleton, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return emb is not None and getattr(emb, "weight", None) is module.weight


# -- validation -----------------------------------------------------------------------------------


def plan_problems(shapes: ModelShapes, run: RunConfig, device: str) -> list[Problem]:
    """Every reason this config cannot run on this model and device, collected (none: it can be planned).
    The datasets are not needed to plan, so an empty dataset list is not a problem here."""
    data = dataclasses.replace(run.data, datasets=run.data.datasets or ["(any)"])
    problems = dataclasses.replace(run, data=data).validate()
    if device not in ("cpu", "cuda"):
        problems.append(Problem("train.device", f"The planner knows 'cpu' and 'cuda', not {device!r}."))
    if device == "cpu" and run.train.compute_type == "fp16" and run.train.device != "cpu":
        problems.append(
            Problem(
                "train.compute_type",
                "fp16 training needs a GPU (no fp16 loss scaling on CPU)",
                "use fp32 or bf16 on CPU.",
            )
        )
    if run.quant.mode != "none" and device not in ("cpu", "cuda"):
        problems.append(Problem("quant.mode", "bitsandbytes quantization runs on CUDA or CPU only."))
    if shapes.max_positions and isinstance(run.data.cutoff_len, int) and run.data.cutoff_len > shapes.max_positions:
        problems.append(
            Problem(
                "data.cutoff_len",
                f"data.cutoff_len={run.data.cutoff_len} is longer than this model's context "
                f"({shapes.max_positions} positions)",
                "lower it.",
            )
        )
    if not run.lora.validate():
        problem = target_problem(run.lora.target_modules, shapes.linear_names)
        if problem:
            problems.append(problem)
        else:
            targets = _targets(shapes, run)
            smallest = min(min(t.in_features, t.out_features) for t in targets)
            if run.lora.r >= smallest:
                problems.append(
                    Problem(
                        "lora.r",
                        f"lora.r={run.lora.r} is not below the smallest adapted dimension ({smallest})",
                        "a low-rank update needs r well under it.",
                    )
                )
    return problems


def _targets(shapes: ModelShapes, run: RunConfig) -> list[LinearShape]:
    return adapted_layers(shapes.linears, run.lora.target_modules)


# -- the estimate ---------------------------------------------------------------------------------


def base_weight_bytes(shapes: ModelShapes, run: RunConfig, rest_width: int = 4) -> tuple[int, str]:
    """The base model's weights while training. `rest_width`: bytes per non-quantized parameter of a
    quantized base (4 after prepare_model_for_kbit_training; the load dtype's width while loading)."""
    q = run.quant
    n_quantizable = sum(x.out_features * x.in_features for x in shapes.linears if not x.output_layer)
    n_rest = shapes.total_params - n_quantizable
    if q.mode == "none":
        width = DTYPE_BYTES[run.train.compute_type]
        return (
            shapes.total_params * width,
            f"{shapes.total_params / 1e6:,.1f} M params x {width} B ({run.train.compute_type})",
        )
    if q.mode == "8bit":
        scales = sum(x.out_features for x in shapes.linears if not x.output_layer) * INT8_ROW_SCALE_BYTES
        quantized = n_quantizable + scales
        how = "int8 + fp32 row scales"
    else:
        absmax = n_quantizable / BNB4_BLOCK
        scale_bytes = absmax * 1 + absmax / BNB4_DQ_BLOCK * 4 if q.double_quant else absmax * 4
        quantized = int(n_quantizable / 2 + scale_bytes)
        how = f"{q.quant_type.upper()} 0.5 B + {'8-bit double-quantized' if q.double_quant else 'fp32'} block scales"
    # peft's prepare_model_for_kbit_training casts every non-quantized parameter (embeddings, norms, LM head)
    # to fp32 for stable training, whatever dtype they were loaded in.
    rest = n_rest * rest_width
    why = (
        f"{n_quantizable / 1e6:,.1f} M linear params in {how}; "
        f"{n_rest / 1e6:,.1f} M others (embeddings, norms, head) {rest_width} B"
    )
    return int(quantized + rest), why


def optimizer_bytes(shapes: ModelShapes, run: RunConfig, trainable: int) -> tuple[int, str]:
    opt = run.train.optimizer
    if opt in ("adamw_torch", "paged_adamw_32bit"):
        return trainable * 8, "AdamW: 2 fp32 states per trainable param"
    if opt in ("adamw_8bit", "paged_adamw_8bit"):
        return int(trainable * 2 * (1 + 4 / OPT8_BLOCK)), "8-bit AdamW: 2 x 1 B per trainable param + block scales"
    if opt == "sgd":
        return 0, "SGD without momentum (transformers' default): no state"
    # Adafactor factors each matrix's second moment into a row and a column vector (fp32).
    factored = sum((run.lora.r + lin.in_features) + (lin.out_features + run.lora.r) for lin in _targets(shapes, run))
    return factored * 4, "Adafactor: fp32 row + column factors per LoRA matrix"


def activation_bytes_per_token_layer(shapes: ModelShapes, run: RunConfig, device: str = "cuda") -> int:
    """Bytes autograd keeps per token per decoder layer for a Llama-style block with LoRA.

    Counted with a saved_tensors_hooks probe on the bundled model (`python -m bench`, "saved_for_backward"):
    the frozen base linears save nothing (their input gradient needs only the weight); what is kept:
    - each RMSNorm keeps an fp32 copy of its input: 2 x 4h;
    - SDPA keeps q, k, v (KV heads repeated to h when a mask is given) and its output: 4h; with a
      block-diagonal mask (packing) each layer also keeps its own seq-wide mask row per token (seq x b);
    - the MLP keeps gate, silu(gate) and up for the product's backward: 3i; in fp32 on a quantized base
      (peft upcasts the norms to fp32, so the residual stream and the 4/8-bit linears' outputs are fp32);
    - each adapted module with dropout: peft casts its input to the adapters' fp32, dropout keeps its
      mask (on CPU a full fp32 tensor, torch's non-fused dropout; on CUDA the fused kernel's 1-byte
      mask), and lora_A keeps the dropped-out input in the compute width b; without dropout, the
      shared input once (norm output for q/k/v and gate/up; o_proj reuses SDPA's output; down_proj
      needs the MLP product); plus the r-wide LoRA A output;
    - eager attention (not SDPA) also keeps the scores and softmax: 2 x heads x seq per token.
    Values are in the activation width b (compute dtype); norm copies are fp32.
    """
    b = DTYPE_BYTES[run.train.compute_type]
    h, i = shapes.hidden, shapes.intermediate
    mlp_b = 4 if run.quant.mode != "none" else b
    per_token = 2 * 4 * h + 4 * h * b + 3 * i * mlp_b
    if run.data.packing:
        per_token += run.data.cutoff_len * b
    dropout = run.lora.dropout > 0
    mask_width = 4 if device == "cpu" else 1
    layers = max(1, shapes.layers)
    adapted = 0.0  # summed over the whole model, then averaged per layer
    shared: dict[tuple[str, int], int] = {}
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}
    for lin in _targets(shapes, run):
        adapted += run.lora.r * b
        if dropout:
            adapted += lin.in_features * (b + mask_width)
        elif lin.name != "o_proj":  # o_proj's input is SDPA's output, already kept
            key = (groups.get(lin.name, lin.name), lin.in_features)
            shared[key] = shared.get(key, 0) + lin.in_features * b
    # Without dropout, modules fed the same tensor keep it once: divide each group by its member count.
    counts: dict[tuple[str, int], int] = {}
    for lin in _targets(shapes, run):
        key = (groups.get(lin.name, lin.name), lin.in_features)
        counts[key] = counts.get(key, 0) + 1
    adapted += sum(total / counts[key] * layers for key, total in shared.items())
    per_token += int(adapted / layers)
    if shapes.eager_attention:
        per_token += 2 * shapes.heads * run.data.cutoff_len * b
    return int(per_token)


def load_items(shapes: ModelShapes, run: RunConfig, device: str) -> tuple[Item, ...]:
    """What loading holds at its peak on CPU, measured by `python -m bench` (phase "load").

    transformers 5 maps the safetensors file. Loaded in the dtype it is stored in, the parameters are views
    of the mapping: file pages fault in as the weights are used, nothing is copied, and the base-weights
    item already counts them. Loaded in another dtype or quantized, every tensor is read through the mapping
    (its pages stay resident until loading returns) and converted into a new copy: the peak is the whole
    file plus the converted weights (for 4/8-bit: the quantized linears plus the rest in the load dtype,
    before peft upcasts it). On CUDA the file pages are host memory, not device memory: nothing to add."""
    if device != "cpu" or shapes.file_dtype not in DTYPE_BYTES:
        return ()
    q = run.quant
    load_dtype = (q.compute_dtype if q.mode == "4bit" else run.train.compute_type) if q.mode != "none" else None
    if q.mode == "none" and run.train.compute_type == shapes.file_dtype:
        return ()
    file_bytes = shapes.total_params * DTYPE_BYTES[shapes.file_dtype]
    if q.mode == "none":
        copy, why = base_weight_bytes(shapes, run)
        why = f"converted from {shapes.file_dtype}: {why}"
    else:
        copy, why = base_weight_bytes(shapes, run, DTYPE_BYTES[load_dtype or "fp32"])
        why = f"quantized while loading: {why}"
    return (
        Item(
            "loading: file pages",
            file_bytes,
            f"the mapped weight file, {shapes.total_params / 1e6:,.1f} M params x "
            f"{DTYPE_BYTES[shapes.file_dtype]} B ({shapes.file_dtype}), resident until loading returns",
        ),
        Item("loading: weights", copy, why),
    )


PAIRED_STAGES = ("dpo", "orpo")  # stages that run chosen and rejected answers side by side


def reference_pass(run: RunConfig) -> bool:
    """Whether the stage computes reference log-probs: DPO (not SimPO, which is reference-free) and KTO."""
    return (run.stage == "dpo" and run.preference.loss_type != "simpo") or run.stage == "kto"


def plan_memory(
    model_config: Any,
    run_config: RunConfig,
    device: str = "cpu",
    shapes: ModelShapes | None = None,
) -> MemoryPlan:
    """Peak training memory for this run on this model, as a breakdown. Raises PlanError on a config that
    cannot run. Pass `shapes` (from `model_shapes`) to skip building the skeleton again."""
    shapes = shapes if shapes is not None else model_shapes(model_config)
    problems = plan_problems(shapes, run_config, device)
    if problems:
        raise PlanError(problems)
    run = run_config
    batch, cutoff = run.train.batch_size, run.data.cutoff_len
    # DPO and ORPO put each pair's chosen and rejected answer through the model in one batch: twice the rows.
    sides = 2 if run.stage in PAIRED_STAGES else 1
    tokens = batch * cutoff * sides
    b = DTYPE_BYTES[run.train.compute_type]
    trainable = lora_param_count(shapes.linears, run.lora)

    weights, weights_why = base_weight_bytes(shapes, run)
    opt, opt_why = optimizer_bytes(shapes, run, trainable)
    per_layer = activation_bytes_per_token_layer(shapes, run, device)
    if run.train.gradient_checkpointing:
        # Only each layer's input survives the forward; backward recomputes one layer at a time.
        acts = tokens * (shapes.layers * shapes.hidden * b + per_layer)
        acts_why = f"checkpointing: {shapes.layers} layer inputs + one layer recomputed ({per_layer:,} B/token)"
    else:
        acts = tokens * shapes.layers * per_layer
        rows = f"{batch} x 2 (chosen, rejected)" if sides == 2 else f"{batch}"
        acts_why = f"{rows} x {cutoff} tokens x {shapes.layers} layers x {per_layer:,} B (saved for backward)"
    # The loss upcasts the logits to fp32, log-softmax keeps its fp32 output, backward adds an fp32 gradient.
    logit_width = b + (4 if b != 4 else 0) + 4 + 4
    logits = tokens * shapes.vocab * logit_width
    items = [
        Item("base weights", weights, weights_why),
        Item(
            "LoRA weights", trainable * 4, f"{trainable / 1e6:,.2f} M trainable params, fp32 (peft keeps adapters fp32)"
        ),
        Item("gradients", trainable * 4, "fp32, LoRA parameters only (the base is frozen)"),
        Item("optimizer states", opt, opt_why),
        Item("activations", int(acts), acts_why),
        Item("logits and loss", int(logits), f"{tokens:,} tokens x vocab {shapes.vocab:,} x {logit_width} B"),
    ]
    if reference_pass(run):
        # The reference log-probs: the same weights without gradients (adapter off or its frozen copy), run
        # while the policy's activations are held; its logits and their fp32 log-softmax live until reduced.
        items.append(
            Item("reference pass", int(tokens * shapes.vocab * (b + 4)), "logits of the no-grad reference forward")
        )
    if run.quant.mode != "none" and b != 4:
        # peft upcasts the LM head to fp32; under autocast its matmul keeps a compute-dtype copy for backward.
        head = sum(x.out_features * x.in_features for x in shapes.linears if x.output_layer)
        head = head or shapes.vocab * shapes.hidden  # tied head: the embedding matrix
        items.append(Item("LM head cast", head * b, "autocast's compute-dtype copy of the fp32 LM head, per forward"))
    if run.quant.mode != "none":
        # bitsandbytes dequantizes one weight at a time to the compute dtype for each matmul.
        largest = max(x.out_features * x.in_features for x in shapes.linears if not x.output_layer)
        width = DTYPE_BYTES[run.quant.compute_dtype]
        items.append(Item("dequant buffer", largest * width, "the largest linear unpacked per matmul"))
    if device == "cuda":
        items.append(Item("overhead", CUDA_CONTEXT_BYTES, "CUDA context and kernels (not in max_memory_allocated)"))
    else:
        items.append(Item("overhead", CPU_RUNTIME_BYTES, "Python/torch/peft runtime, measured (python -m bench)"))
    return MemoryPlan(
        device=device,
        items=tuple(items),
        trainable_params=trainable,
        tokens_per_step=tokens,
        load_items=load_items(shapes, run, device),
    )


# -- what would make it fit -----------------------------------------------------------------------


def _with(run: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    updates = {name: dataclasses.replace(getattr(run, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(run, **updates)


def candidate_changes(run: RunConfig) -> list[tuple[str, RunConfig]]:
    t, out = run.train, []
    if run.quant.mode != "4bit":
        qlora = _with(run, quant={"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"})
        out.append(("QLoRA: 4-bit NF4 base with double quantization", qlora))
    if t.batch_size > 1:
        half = t.batch_size // 2
        change = f"batch {t.batch_size} -> {half}, accumulation {t.grad_accum} -> {t.grad_accum * 2}"
        out.append((change, _with(run, train={"batch_size": half, "grad_accum": t.grad_accum * 2})))
    if run.data.cutoff_len >= 16:
        half = run.data.cutoff_len // 2
        out.append((f"cutoff {run.data.cutoff_len} -> {half} tokens", _with(run, data={"cutoff_len": half})))
    if not t.gradient_checkpointing:
        out.append(("gradient checkpointing on", _with(run, train={"gradient_checkpointing": True})))
    if run.lora.r >= 2:
        out.append((f"rank {run.lora.r} -> {run.lora.r // 2}", _with(run, lora={"r": run.lora.r // 2})))
    return out


def suggestions(
    model_config: Any,
    run_config: RunConfig,
    available: int | None,
    device: str = "cpu",
    shapes: ModelShapes | None = None,
) -> list[Suggestion]:
    """One change at a time, each with its new estimate; those that fit first, then smallest first.
    Changes that would make the config invalid (e.g. QLoRA with PiSSA init) are left out."""
    shapes = shapes if shapes is not None else model_shapes(model_config)
    out = []
    for change, cfg in candidate_changes(run_config):
        if plan_problems(shapes, cfg, device):
            continue
        out.append(Suggestion(change, cfg, plan_memory(model_config, cfg, device, shapes)))
    fits = [s for s in out if available is not None and s.plan.fits(available)]
    rest = [s for s in out if s not in fits]
    return sorted(fits, key=lambda s: s.plan.total_bytes) + sorted(rest, key=lambda s: s.plan.total_bytes)


# -- the machine ----------------------------------------------------------------------------------


def device_free_memory(device: str) -> int | None:
    """Free bytes on the device: CUDA's own count, or the memory the system can give without swapping
    (psutil's `available`, the kernel's MemAvailable on Linux) on CPU; None if unknown."""
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
        except (ImportError, RuntimeError):
            return None
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, psutil.Error):
        return None


def plan_device(preference: str) -> str:
    """The device a run would train on: 'auto' is CUDA when one is visible, else CPU."""
    if preference == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return preference


def allocator_caveat(device: str, allocator: str) -> str | None:
    """The CPU estimates were measured under tcmalloc (what the worker preloads when installed). Under
    glibc malloc the same runs peaked 8% (LoRA fp32) to 35% (with checkpointing) higher (studio/core/allocator.py)."""
    if device != "cpu" or allocator in ("tcmalloc", "jemalloc"):
        return None
    return (
        "The worker will run under glibc malloc here (no tcmalloc found), which can hold up to ~40% more "
        "than this estimate on CPU: install libtcmalloc-minimal4 to get the estimate (and a faster run)."
    )


def report_text(plan: MemoryPlan, available: int | None, tips: list[Suggestion], caveat: str | None = None) -> str:
    """The plan, the free memory and, when it does not fit, the changes that would help (plain text)."""
    lines = [plan.describe(), ""]
    if caveat:
        lines += [f"note: {caveat}", ""]
    if available is None:
        lines.append(f"free on {plan.device}: unknown")
        return "\n".join(lines)
    verdict = "fits" if plan.fits(available) else "does NOT fit"
    lines.append(f"free on {plan.device}: {fmt_bytes(available)}  ->  {verdict}")
    if not plan.fits(available):
        lines += ["", "changes that help (one at a time):"]
        for s in tips:
            mark = "fits" if s.plan.fits(available) else "still too big"
            lines.append(f"  - {s.change}: {fmt_bytes(s.plan.total_bytes)} ({mark})")
    return "\n".join(lines)
