"""LoRA targets: the linear layers a LoRA can adapt, the named groups of them, THE check that a config's
target modules exist in a model, and THE count of the parameters a LoRA adds.

Everything here works on a weightless skeleton (or on the layer shapes read from one): no weights load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.core.problems import Problem

if TYPE_CHECKING:
    from studio.core.config import LoraSpec

ALL_LINEAR = "all-linear"
TARGET_GROUPS = {  # besides 'all-linear': groups of the usual (Llama-style) layer names
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "q,v": ("q_proj", "v_proj"),
}
# Layer types a LoRA can adapt besides torch.nn.Linear: bitsandbytes' quantized linears, GPT-2's Conv1D.
LINEAR_TYPES = ("Linear4bit", "Linear8bitLt", "Conv1D")


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of the model (per block, not aggregated)."""

    name: str  # short name: q_proj, down_proj, ...
    out_features: int
    in_features: int
    has_bias: bool
    output_layer: bool  # the LM head: never quantized by bitsandbytes, never a default LoRA target


def linear_modules(model) -> list[tuple[str, Any]]:
    """(full name, module) of every linear layer, in model order."""
    import torch

    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in LINEAR_TYPES:
            out.append((name, module))
    return out


def output_layer_names(model) -> set[str]:
    """The LM head (and anything tied to the output embedding): never a LoRA target by default."""
    names = {"lm_head", "embed_out", "output"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                names.add(name.split(".")[-1])
    return names


def linear_layer_names(model) -> list[str]:
    """Distinct short names of the linear layers a LoRA can target (q_proj, v_proj, ...), in model order."""
    skip = output_layer_names(model)
    seen: dict[str, None] = {}
    for name, _ in linear_modules(model):
        short = name.split(".")[-1]
        if short not in skip:
            seen.setdefault(short, None)
    return list(seen)


def linear_shapes(model) -> list[LinearShape]:
    """The shape of every linear layer, output layers marked."""
    skip = output_layer_names(model)
    shapes = []
    for name, module in linear_modules(model):
        short = name.split(".")[-1]
        out_f, in_f = module.weight.shape[0], module.weight.shape[1]
        has_bias = getattr(module, "bias", None) is not None
        shapes.append(LinearShape(short, int(out_f), int(in_f), has_bias, short in skip))
    return shapes


def targetable_names(layers: Iterable[LinearShape]) -> list[str]:
    """Distinct short names of the layers that are not output layers, in model order."""
    seen: dict[str, None] = {}
    for lin in layers:
        if not lin.output_layer:
            seen.setdefault(lin.name, None)
    return list(seen)


def expand_targets(target_modules: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """'all-linear' and the named groups, or an explicit list, as concrete layer names."""
    if isinstance(target_modules, str):
        key = target_modules.strip().lower()
        if key == ALL_LINEAR:
            return list(available)
        if key in TARGET_GROUPS:
            return [n for n in available if n in TARGET_GROUPS[key]]
        return [t.strip() for t in target_modules.split(",") if t.strip()]
    return list(target_modules)


def target_problem(target_modules: str | Sequence[str], available: Sequence[str]) -> Problem | None:
    """THE target check: why these target modules cannot be adapted in a model whose linear layers are
    `available` (names it lacks, or nothing to adapt at all), or None when they can."""
    targets = expand_targets(target_modules, available)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        return Problem(
            "lora.target_modules",
            f"lora.target_modules: {', '.join(missing) or '(none)'} not found in this model. "
            f"Its linear layers are: {', '.join(available)}; or use 'all-linear'.",
        )
    return None


def adapted_layers(layers: Iterable[LinearShape], target_modules: str | Sequence[str]) -> list[LinearShape]:
    """The layers a LoRA with these target modules adapts (never an output layer)."""
    layers = list(layers)
    names = set(expand_targets(target_modules, targetable_names(layers)))
    return [lin for lin in layers if lin.name in names and not lin.output_layer]


def lora_param_count(layers: Iterable[LinearShape], lora: LoraSpec) -> int:
    """THE count of the trainable parameters a LoRA adds, from layer shapes: r*(in + out) per adapted
    matrix W (out x in); DoRA adds a magnitude vector of `out`; a trained bias adds `out`."""
    total = 0
    for lin in adapted_layers(layers, lora.target_modules):
        total += lora.r * (lin.in_features + lin.out_features)
        if lora.use_dora:
            total += lin.out_features
        if lora.bias != "none" and lin.has_bias:
            total += lin.out_features
    return total
