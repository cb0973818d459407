"""The Train tab: a form that is exactly a RunConfig, a queue button, and a live view of one run.

The form is derived from the config dataclasses: FORM_KEYS lists every config field as "section.field"
(plus two UI-only helpers), widgets are built from each field's type and help text, and
`config_from_form` / `form_from_config` convert between widget values and RunConfig. Training runs in a
worker process started by the JobManager; this module only reads the store to show progress.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import Context

from studio.core.config import (
    BIAS_MODES,
    COMPUTE_TYPES,
    DEVICES,
    DPO_LOSSES,
    LORA_INITS,
    OPTIMIZERS,
    QUANT_MODES,
    QUANT_TYPES,
    SCHEDULERS,
    STAGES,
    STRATEGIES,
    TARGET_GROUPS,
    ConfigError,
    LoraSpec,
    RunConfig,
)
from studio.core.store import Metric, Run, RunNotFound, RunStatus
from studio.runs.queue import JobError
from studio.runs.sweep import DEFAULT_SCAN_STEPS, SWEEPABLE
from studio.training.coach import advice_for_run
from studio.ui import charts
from studio.ui.common import UIContext, coach_markdown, error_message

# -- the form as data ---------------------------------------------------------------------------


def _config_fields() -> list[tuple[str, dataclasses.Field]]:
    """('section.field', Field) for every leaf of RunConfig, in declaration order ('name' has no section)."""
    out = []
    for top in dataclasses.fields(RunConfig):
        spec = top.default_factory if dataclasses.is_dataclass(top.default_factory) else None
        if spec is None:
            out.append((top.name, top))
        else:
            out += [(f"{top.name}.{f.name}", f) for f in dataclasses.fields(spec)]
    return out


CONFIG_FIELDS = dict(_config_fields())
TARGET_GROUP = "lora.target_group"  # UI only: all-linear / attention / q,v / custom
QLORA = "quant.qlora"  # UI only: the one-click 4-bit NF4 toggle
CUSTOM = "custom"
FORM_KEYS = [*CONFIG_FIELDS, TARGET_GROUP, QLORA]

ELEM_IDS = {
    "name": "run-name",
    "stage": "train-stage",
    "model.source": "train-model",
    "model.trust_remote_code": "model-trust-code",
    "lora.r": "lora-r",
    "lora.alpha": "lora-alpha",
    "lora.dropout": "lora-dropout",
    "lora.target_modules": "lora-targets",
    "lora.bias": "lora-bias",
    "lora.use_rslora": "lora-rslora",
    "lora.use_dora": "lora-dora",
    "lora.init": "lora-init",
    "lora.loraplus_lr_ratio": "lora-plus-ratio",
    "quant.mode": "quant-mode",
    "quant.quant_type": "quant-type",
    "quant.double_quant": "quant-double",
    "quant.compute_dtype": "quant-compute",
    "data.datasets": "train-dataset",
    "data.cutoff_len": "data-cutoff",
    "data.max_samples": "data-max-samples",
    "data.val_size": "data-val-size",
    "data.packing": "data-packing",
    "data.group_by_length": "data-group-by-length",
    "data.pad_to_cutoff": "data-pad-to-cutoff",
    "data.train_on_prompt": "data-train-on-prompt",
    "train.epochs": "train-epochs",
    "train.max_steps": "train-max-steps",
    "train.learning_rate": "train-lr",
    "train.lr_scheduler": "train-scheduler",
    "train.warmup_ratio": "train-warmup",
    "train.batch_size": "train-batch",
    "train.grad_accum": "train-accum",
    "train.max_grad_norm": "train-grad-norm",
    "train.weight_decay": "train-weight-decay",
    "train.optimizer": "train-optimizer",
    "train.gradient_checkpointing": "train-grad-ckpt",
    "train.seed": "train-seed",
    "train.logging_steps": "train-logging-steps",
    "train.eval_steps": "train-eval-steps",
    "train.save_steps": "train-save-steps",
    "train.save_total_limit": "train-save-limit",
    "train.compute_type": "compute-type",
    "train.device": "train-device",
    "train.num_threads": "train-threads",
    "train.stop_on_divergence": "train-stop-on-divergence",
    "train.early_stopping_patience": "train-early-stopping",
    "distribution.processes": "dist-processes",
    "distribution.strategy": "dist-strategy",
    "distribution.offload": "dist-offload",
    "distribution.devices": "dist-devices",
    "distribution.num_machines": "dist-machines",
    "distribution.machine_rank": "dist-machine-rank",
    "distribution.main_address": "dist-main-address",
    "distribution.main_port": "dist-main-port",
    "preference.beta": "pref-beta",
    "preference.loss_type": "pref-loss",
    "preference.label_smoothing": "pref-label-smoothing",
    "preference.simpo_gamma": "pref-simpo-gamma",
    "preference.sft_weight": "pref-sft-weight",
    "preference.desirable_weight": "pref-desirable-weight",
    "preference.undesirable_weight": "pref-undesirable-weight",
    "preference.start_from": "pref-start-from",
    TARGET_GROUP: "lora-target-group",
    QLORA: "qlora",
}

CHOICES: dict[str, Sequence[str]] = {
    "lora.bias": BIAS_MODES,
    "lora.init": LORA_INITS,
    "quant.mode": QUANT_MODES,
    "quant.quant_type": QUANT_TYPES,
    "quant.compute_dtype": COMPUTE_TYPES,
    "train.lr_scheduler": SCHEDULERS,
    "train.optimizer": OPTIMIZERS,
    "train.compute_type": COMPUTE_TYPES,
    "train.device": DEVICES,
    "distribution.strategy": STRATEGIES,
    "stage": STAGES,
    "preference.loss_type": DPO_LOSSES,
    TARGET_GROUP: (*TARGET_GROUPS, CUSTOM),
}

LABELS = {
    "name": "Run name",
    "stage": "Stage",
    "preference.loss_type": "DPO loss",
    "preference.simpo_gamma": "SimPO gamma",
    "preference.sft_weight": "SFT weight (RPO)",
    "preference.desirable_weight": "KTO desirable weight",
    "preference.undesirable_weight": "KTO undesirable weight",
    "preference.start_from": "Start from run",
    "model.source": "Model",
    "model.trust_remote_code": "Trust remote code",
    "data.datasets": "Datasets",
    "lora.r": "Rank r",
    "lora.target_modules": "Target modules",
    "lora.use_rslora": "rsLoRA",
    "lora.use_dora": "DoRA",
    "lora.loraplus_lr_ratio": "LoRA+ lr ratio",
    "quant.mode": "Quantization",
    "quant.double_quant": "Double quantization",
    "train.max_grad_norm": "Max grad norm",
    "train.gradient_checkpointing": "Gradient checkpointing",
    "train.stop_on_divergence": "Stop on divergence (coach)",
    "train.early_stopping_patience": "Early stopping patience",
    "distribution.devices": "GPUs",
    "distribution.offload": "Offload to CPU (DeepSpeed)",
    TARGET_GROUP: "Target group",
    QLORA: "QLoRA (4-bit NF4 base)",
}

# Arrow-key steps for float fields; the value itself is never rounded.
STEPS = {"train.learning_rate": 1e-5, "train.epochs": 0.5, "lora.alpha": 1.0, "lora.loraplus_lr_ratio": 1.0}

PREFERENCE_SECTION = "Preference training (DPO, KTO, ORPO)"  # shown only for those stages
# The form's sections as the user sees them (the top row holds model, preset, datasets and name).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "LoRA",
        (
            "lora.r",
            "lora.alpha",
            "lora.dropout",
            TARGET_GROUP,
            "lora.target_modules",
            "lora.bias",
            "lora.init",
            "lora.loraplus_lr_ratio",
            "lora.use_rslora",
            "lora.use_dora",
        ),
    ),
    (
        "Quantization and precision",
        (
            QLORA,
            "quant.mode",
            "quant.quant_type",
            "quant.double_quant",
            "quant.compute_dtype",
            "train.compute_type",
            "train.device",
            "train.num_threads",
        ),
    ),
    (
        "Optimization",
        (
            "train.learning_rate",
            "train.max_steps",
            "train.epochs",
            "train.lr_scheduler",
            "train.warmup_ratio",
            "train.batch_size",
            "train.grad_accum",
            "train.max_grad_norm",
            "train.weight_decay",
            "train.optimizer",
            "train.gradient_checkpointing",
            "train.seed",
        ),
    ),
    (
        "Data",
        (
            "data.cutoff_len",
            "data.max_samples",
            "data.val_size",
            "data.packing",
            "data.group_by_length",
            "data.pad_to_cutoff",
            "data.train_on_prompt",
        ),
    ),
    (
        "Saving, evaluation and stopping",
        (
            "train.logging_steps",
            "train.eval_steps",
            "train.save_steps",
            "train.save_total_limit",
            "train.early_stopping_patience",
            "train.stop_on_divergence",
        ),
    ),
    (
        PREFERENCE_SECTION,
        (
            "preference.start_from",
            "preference.beta",
            "preference.loss_type",
            "preference.label_smoothing",
            "preference.simpo_gamma",
            "preference.sft_weight",
            "preference.desirable_weight",
            "preference.undesirable_weight",
        ),
    ),
    (
        "Scale out: processes and GPUs",
        (
            "distribution.processes",
            "distribution.strategy",
            "distribution.devices",
            "distribution.offload",
            "distribution.num_machines",
            "distribution.machine_rank",
            "distribution.main_address",
            "distribution.main_port",
        ),
    ),
)
TOP_KEYS = ("model.source", "model.trust_remote_code", "data.datasets", "stage", "name")


def _annotation(key: str) -> str:
    return str(CONFIG_FIELDS[key].type) if key in CONFIG_FIELDS else ""


def _is_number_field(key: str) -> bool:
    kind = _annotation(key)
    return kind.startswith(("int", "float"))


def _zero_means_none(key: str) -> bool:
    """Optional numbers (max_samples, LoRA+ ratio, threads) show 0 for 'off' in a number widget."""
    return _is_number_field(key) and "None" in _annotation(key)


# -- form <-> RunConfig -------------------------------------------------------------------------


def _split_names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def config_from_form(values: Sequence[Any]) -> RunConfig:
    """Widget values in FORM_KEYS order -> RunConfig. Bad values pass through for validate() to name."""
    form = dict(zip(FORM_KEYS, values, strict=True))
    nested: dict[str, Any] = {}
    for key in CONFIG_FIELDS:
        value = form[key]
        if _zero_means_none(key) and value in (0, None):
            value = None
        elif isinstance(value, str):
            value = value.strip()
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    group = form[TARGET_GROUP]
    nested["lora"]["target_modules"] = group if group in TARGET_GROUPS else _split_names(form["lora.target_modules"])
    nested["data"]["datasets"] = _split_names(form["data.datasets"])
    # The QLoRA checkbox is the headline toggle: it wins over a stale quantization dropdown.
    mode = nested["quant"]["mode"]
    if form[QLORA] is True and mode != "4bit":
        nested["quant"]["mode"] = "4bit"
    elif form[QLORA] is False and mode == "4bit":
        nested["quant"]["mode"] = "none"
    return RunConfig.from_dict(nested)


def target_group_of(targets: str | list[str]) -> str:
    if isinstance(targets, str) and targets.strip().lower() in TARGET_GROUPS:
        return targets.strip().lower()
    return CUSTOM


def form_from_config(cfg: RunConfig, layers: Sequence[str] | None = None) -> list[Any]:
    """RunConfig -> widget values in FORM_KEYS order. `layers` (the model's linear layers) lets a named
    target group show as the ticked layers it stands for."""
    from studio.model.targets import expand_targets

    flat = {}
    for key in CONFIG_FIELDS:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        flat[key] = 0 if _zero_means_none(key) and obj is None else obj
    group = target_group_of(cfg.lora.target_modules)
    if group == CUSTOM:
        flat["lora.target_modules"] = cfg.lora.target_list()
    else:
        flat["lora.target_modules"] = expand_targets(group, list(layers)) if layers else []
    flat["data.datasets"] = list(cfg.data.datasets)
    flat[TARGET_GROUP] = group
    flat[QLORA] = cfg.quant.mode == "4bit"
    return [flat[k] for k in FORM_KEYS]


def form_value(values: Sequence[Any], key: str) -> Any:
    return values[FORM_KEYS.index(key)]


# -- model inspection ---------------------------------------------------------------------------


_INSPECT_LOCK = threading.Lock()  # gradio runs events in threads; transformers' lazy imports are not thread-safe

PREPARING_NOTE = (
    "⏳ **Preparing the bundled model (first start, about a minute)…** Everything on this page can be filled "
    "in and started meanwhile; target modules show the bundled model's layers, and the parameter count and "
    "memory estimate follow once it is ready."
)


def bundled_note(source: str | None) -> str | None:
    """None when the form's model can be read now; else what to show instead: the bundled model is still
    being converted (in the background, started by the server or here) or its preparation failed.
    Never waits for the conversion, so no handler of the tab does."""
    from studio.model.loading import is_bundled_source, prepare_bundled_model

    if not is_bundled_source(source):
        return None
    state = prepare_bundled_model()
    if state.ready:
        return None
    if state.state == "failed":
        return f"**Model:** the bundled model is not available: {state.error}"
    return PREPARING_NOTE


def _inspect(source: str, trust: bool, lora_json: str | None) -> dict:
    with _INSPECT_LOCK:
        return _inspect_cached(source, trust, lora_json)


@functools.lru_cache(maxsize=32)
def _inspect_cached(source: str, trust: bool, lora_json: str | None) -> dict:
    from studio.model.loading import inspect_model

    lora = LoraSpec(**json.loads(lora_json)) if lora_json is not None else None
    return inspect_model(source, lora, trust_remote_code=trust)


def model_layers(source: str, trust_remote_code: bool = False) -> list[str]:
    """The model's linear layer names (target-module choices); raises ModelError when it cannot be read.
    While the bundled model is being prepared, its known layers, at once."""
    from studio.model.loading import BUNDLED_LINEAR_LAYERS

    if bundled_note(source) is not None:
        return list(BUNDLED_LINEAR_LAYERS)
    return list(_inspect(source or "bundled", bool(trust_remote_code), None)["linear_layers"])


def params_text(cfg: RunConfig) -> str:
    """Trainable-parameter count for the form's model and LoRA settings, from a weightless skeleton."""
    from studio.model.loading import ModelError

    note = bundled_note(cfg.model.source)
    if note is not None:
        return note
    try:
        lora_json = json.dumps(dataclasses.asdict(cfg.lora))
        info = _inspect(cfg.model.source or "bundled", cfg.model.trust_remote_code, lora_json)
    except (ModelError, ImportError, TypeError, ValueError, OSError) as err:
        return f"**Model:** cannot inspect `{cfg.model.source}`: {err}"
    count = info["lora_parameters"]
    return f"**{info['name']}** ({info['model_type']}): {count.describe()}"


def params_from_form(*values: Any) -> str:
    try:
        cfg = config_from_form(values)
    except ConfigError as err:
        return error_message(err)
    if cfg.lora.validate():
        return "Trainable parameters: fix the LoRA settings first."
    return params_text(cfg)


def group_targets(group: str, layers: Sequence[str], current: Sequence[str]) -> list[str]:
    """The layers a picked group stands for; 'custom' keeps the user's ticks."""
    from studio.model.targets import expand_targets

    return list(current or []) if group == CUSTOM else expand_targets(group, list(layers))


def group_for_targets(targets: Sequence[str], layers: Sequence[str]) -> str:
    """A hand-picked set that equals a named group is that group (so the YAML stays portable)."""
    from studio.model.targets import expand_targets

    for group in TARGET_GROUPS:
        expanded = expand_targets(group, list(layers))
        if expanded and set(expanded) == set(targets or []):
            return group
    return CUSTOM


# -- memory plan --------------------------------------------------------------------------------

# The form fields the memory estimate depends on: the plan panel follows these.


def _model_for_plan(source: str, trust: bool) -> tuple:
    with _INSPECT_LOCK:
        return _model_for_plan_cached(source, trust)


@functools.lru_cache(maxsize=8)
def _model_for_plan_cached(source: str, trust: bool) -> tuple:
    """(HF config, planner shapes) per model source: the skeleton is built once, not on every keystroke."""
    from studio.model.loading import load_config, resolve_model
    from studio.model.memory import model_shapes

    config = load_config(resolve_model(source), trust)
    return config, model_shapes(config)


def plan_text(cfg: RunConfig, available: int | None = None, device: str | None = None) -> str:
    """The memory estimate as markdown: breakdown, free memory, a warning and the fixes when it won't fit.
    `available` and `device` default to the machine's own."""
    from studio.core.allocator import choose_allocator
    from studio.model.loading import ModelError
    from studio.model.memory import (
        PlanError,
        allocator_caveat,
        device_free_memory,
        plan_device,
        plan_memory,
        suggestions,
    )

    note = bundled_note(cfg.model.source)
    if note == PREPARING_NOTE:
        return "**Memory estimate:** follows once the bundled model is ready."
    if note is not None:
        return note.replace("**Model:**", "**Memory estimate:**", 1)
    device = device or plan_device(cfg.train.device)
    try:
        model_config, shapes = _model_for_plan(cfg.model.source or "bundled", bool(cfg.model.trust_remote_code))
        plan = plan_memory(model_config, cfg, device, shapes)
    except PlanError as err:
        return "**Memory estimate:** fix the form first:\n" + "\n".join(f"- {p}" for p in err.problems)
    except (ModelError, ImportError, OSError, ValueError, TypeError) as err:
        return f"**Memory estimate:** cannot read `{cfg.model.source}`: {err}"
    if available is None:
        available = device_free_memory(device)
    fits = plan.fits(available)
    tips = suggestions(model_config, cfg, available, device, shapes) if fits is False else []
    lines = [*_plan_table(plan, cfg, device), *_fit_lines(plan, available, device, tips)]
    caveat = allocator_caveat(device, choose_allocator().name)
    if caveat:
        lines += ["", f"Note: {caveat}"]
    return "\n".join(lines)


def _plan_table(plan, cfg: RunConfig, device: str) -> list[str]:
    """The estimate's headline and its breakdown as a markdown table."""
    from studio.model.memory import fmt_bytes

    rows = [f"| {i.name} | {fmt_bytes(i.bytes)} | {i.why} |" for i in plan.items]
    return [
        f"**Memory estimate: {fmt_bytes(plan.total_bytes)}** peak on {device}"
        f" ({cfg.train.batch_size} x {cfg.data.cutoff_len} tokens per step)",
        "",
        "| item | estimate | why |",
        "|---|---:|---|",
        *rows,
        "",
    ]


def _fit_lines(plan, available: int | None, device: str, tips: Sequence) -> list[str]:
    """Whether it fits the free memory; when it does not, the changes that help (tips: memory.suggestions)."""
    from studio.model.memory import fmt_bytes

    fits = plan.fits(available)
    if fits is None:
        return [f"Free memory on {device}: unknown."]
    if fits:
        return [f"Free memory on {device}: {fmt_bytes(available)}. It fits."]
    lines = [
        f"⚠️ **Will not fit:** {fmt_bytes(plan.total_bytes)} needed, {fmt_bytes(available)} free on {device}. "
        "Changes that help, one at a time:"
    ]
    for tip in tips:
        mark = "fits" if tip.plan.fits(available) else "still too big"
        lines.append(f"- {tip.change}: {fmt_bytes(tip.plan.total_bytes)} ({mark})")
    return lines


def plan_from_form(*values: Any) -> str:
    try:
        cfg = config_from_form(values)
    except ConfigError as err:
        return error_message(err)
    return plan_text(cfg)


# -- command box --------------------------------------------------------------------------------


def _set_value(value: Any) -> str:
    """A value as `--set` parses it (YAML): strings stay bare unless YAML would read them as something else
    ('true', '1', 'null'), floats keep a dot (YAML 1.1 reads '1e-05' as text)."""
    if isinstance(value, str) and value and _yaml_reads_back(value):
        return value
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text  # YAML 1.1 needs the dot
    return json.dumps(value)


def _yaml_reads_back(text: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def set_overrides(base: RunConfig, cfg: RunConfig) -> list[str]:
    """`section.field=value` for every field where cfg differs from base."""
    out = []
    base_dict, cfg_dict = base.to_dict(), cfg.to_dict()
    for key in CONFIG_FIELDS:
        a, b = base_dict, cfg_dict
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            out.append(f"{key}={_set_value(b)}")
    return out


def command_text(cfg: RunConfig, preset: str | None = None) -> str:
    """The headless equivalent of this form: a `studio train` line and the exact config YAML."""
    from studio.core.presets import load_preset

    lines = ["# Run this form headless: save the YAML below as run.yaml, then", "studio train run.yaml", ""]
    if preset:
        try:
            base = load_preset(preset)
        except ConfigError:
            base = None
        if base is not None:
            sets = [f"  --set {shlex.quote(s)}" for s in set_overrides(base, cfg)]
            lines += ["# or, from the preset:", " \\\n".join([f"studio train {shlex.quote(preset)}", *sets]), ""]
    if cfg.distribution.launched:
        from studio.training.launch import launch_text

        lines += [
            f"# {cfg.distribution.processes} processes: the worker starts them through accelerate, as",
            launch_text(cfg),
            "",
        ]
    return "\n".join(lines) + "\n# run.yaml\n" + cfg.to_yaml()


def form_views(preset: str | None, *values: Any) -> tuple[str, str, str]:
    """Parameter count, memory plan and command box for the form, in one request."""
    return params_from_form(*values), plan_from_form(*values), command_from_form(preset, *values)


def command_from_form(preset: str | None, *values: Any) -> str:
    try:
        return command_text(config_from_form(values), preset)
    except ConfigError as err:
        return "# The form cannot be turned into a config yet:\n" + "\n".join(f"# - {p}" for p in err.problems)


# -- presets ------------------------------------------------------------------------------------


def preset_choices(directory: Path | None = None) -> list[str]:
    from studio.core.presets import preset_names

    return preset_names(directory)


def apply_preset(name: str, datasets: Sequence[str], layers: Sequence[str], directory: Path | None = None) -> list:
    """A preset's form values; a preset without datasets keeps the datasets already chosen."""
    from studio.core.presets import load_preset

    cfg = load_preset(name, directory)
    if not cfg.data.datasets:
        cfg.data.datasets = _split_names(datasets)
    return form_from_config(cfg, layers)


def save_form_preset(name: str, values: Sequence[Any], directory: Path | None = None) -> str:
    from studio.core.presets import save_preset

    name = (name or "").strip()
    try:
        cfg = config_from_form(values)
        problems = cfg.lora.validate() + cfg.quant.validate() + cfg.train.validate()
        if problems:
            raise ConfigError(problems)
        path = save_preset(cfg, name, directory=directory)
    except ConfigError as err:
        return error_message(err)
    return f"Saved preset **{name}** ({path.name}). Pick it from the preset list to load it again."


# -- starting and controlling runs --------------------------------------------------------------


def start_training(ctx: UIContext, values: Sequence[Any]) -> tuple[str, str | None]:
    """Validate the form and queue it; every problem is listed at once and nothing starts if any."""
    try:
        cfg = config_from_form(values)
        run = ctx.jobs.submit(cfg)
    except ConfigError as err:
        return error_message(err), None
    except (JobError, OSError) as err:
        return error_message(err), None
    return f"Run `{run.id}` is **{run.status.value}**.", run.id


NO_SECOND_PARAM = "(none)"


def start_sweep(
    ctx: UIContext,
    param: str,
    values_text: str,
    param2: str | None,
    values2_text: str | None,
    scan_steps: float | None,
    values: Sequence[Any],
) -> tuple[str, str | None]:
    """Queue one short scan run per value (or per grid point of two parameters) from the form's config.
    The form's own length (epochs or max steps) is kept for the long run started later from the pick."""
    from studio.runs.sweep import SweepError, parse_params, sweep_notes

    try:
        cfg = config_from_form(values)
        texts = [f"{param}={values_text or ''}"]
        if param2 and param2 != NO_SECOND_PARAM and (values2_text or "").strip():
            texts.append(f"{param2}={values2_text}")
        params = parse_params(texts)
        steps = int(scan_steps or 0)
        sweep, runs = ctx.jobs.submit_sweep(cfg, params, steps, cfg.name or "sweep")
    except (ConfigError, SweepError, JobError, OSError, ValueError) as err:
        return error_message(err), None
    names = ", ".join(f"`{r.name}`" for r in runs)
    notes = "".join(f"\n- {note}" for note in sweep_notes(cfg, params, steps))
    return (
        f"Sweep `{sweep.id}`: {len(runs)} scan runs of {steps} steps queued, cheapest first: {names}. "
        f"Compare them in the Runs tab (Sweeps) and start the long run from the pick there.{notes}"
    ), runs[0].id


def start_preset_run(
    ctx: UIContext, preset: str, datasets: str | list[str] | None, max_steps: int | None, run_name: str | None
) -> tuple[str, str | None]:
    """For API callers: a preset, dataset names and a few fields are enough to start a run."""
    from studio.core.presets import load_preset

    try:
        cfg = load_preset(preset or "quick-demo")
    except ConfigError as err:
        return error_message(err), None
    if _split_names(datasets):
        cfg.data.datasets = _split_names(datasets)
    if max_steps:
        cfg.train.max_steps = int(max_steps)
    if run_name and run_name.strip():
        cfg.name = run_name.strip()
    return start_training(ctx, form_from_config(cfg))


def abort_run(ctx: UIContext, run_id: str | None) -> str:
    if not run_id:
        return "No run selected."
    try:
        run = ctx.jobs.abort(run_id)
    except (JobError, RunNotFound) as err:
        return error_message(err)
    if run.status == RunStatus.RUNNING:
        return f"Abort requested for `{run.id}`: it saves a checkpoint, then stops."
    return f"Run `{run.id}` is {run.status.value}."


def resume_run(ctx: UIContext, run_id: str | None) -> str:
    if not run_id:
        return "No run selected."
    try:
        run = ctx.jobs.resume(run_id)
    except (JobError, RunNotFound) as err:
        return error_message(err)
    start = Path(run.resume_from).name if run.resume_from else "the start"
    return f"Run `{run.id}` is {run.status.value}, resuming from {start}."


def run_status(ctx: UIContext, run_id: str | None) -> dict:
    """A JSON-able summary for API callers."""
    try:
        run = ctx.jobs.store.get_run(run_id or "")
    except RunNotFound as err:
        return {"id": run_id, "status": "unknown", "error": str(err)}
    keys = ("id", "name", "status", "step", "total_steps", "final_loss", "error", "adapter_dir", "duration_s")
    return {k: run.to_dict()[k] for k in keys}


# -- watching a run -----------------------------------------------------------------------------


def run_choices(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return [(f"{r.id} ({r.status.value})", r.id) for r in runs]


def default_run(runs: Sequence[Run]) -> str | None:
    """The newest running or queued run (so a reload re-attaches), else the newest run."""
    active = [r for r in runs if r.status in (RunStatus.RUNNING, RunStatus.QUEUED)]
    pick = active or list(runs)
    return max(pick, key=lambda r: r.created_at).id if pick else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _resume_step(run: Run) -> int:
    from studio.core.workspace import checkpoint_step

    try:
        return checkpoint_step(Path(run.resume_from)) if run.resume_from else 0
    except ValueError:
        return 0


def step_rate(run: Run, metrics: Sequence[Metric], now: float) -> float | None:
    """Steps per second in this session: from logged points once they span a few seconds (model loading
    excluded), else from the elapsed time since the worker started."""
    if run.started_at is None:
        return None
    points = [m for m in metrics if m.time >= run.started_at]
    if len(points) >= 2 and points[-1].time - points[0].time >= 5 and points[-1].step > points[0].step:
        return (points[-1].step - points[0].step) / (points[-1].time - points[0].time)
    done = run.step - _resume_step(run)
    elapsed = now - run.started_at
    return done / elapsed if done > 0 and elapsed > 0 else None


def eta_seconds(run: Run, metrics: Sequence[Metric], now: float) -> float | None:
    if run.status != RunStatus.RUNNING or not run.total_steps:
        return None
    rate = step_rate(run, metrics, now)
    return max(0, run.total_steps - run.step) / rate if rate else None


def progress_html(step: int, total: int) -> str:
    pct = 100.0 * step / total if total else 0.0
    pct = min(100.0, max(0.0, pct))
    label = f"step {step}/{total} ({pct:.0f}%)" if total else f"step {step}"
    return (
        f'<div class="studio-progress" role="progressbar" aria-valuenow="{step}" aria-valuemin="0" '
        f'aria-valuemax="{total}"><div class="track" style="background:#e5e7eb;border-radius:6px;height:12px">'
        f'<div class="bar" style="width:{pct:.1f}%;background:#f97316;border-radius:6px;height:12px"></div></div>'
        f'<div class="studio-progress-label">{html.escape(label)}</div></div>'
    )


def devices_text(run: Run) -> str:
    """' · on GPU 0,1 · 2 processes' for a running run: where the queue put it."""
    processes = (run.config.get("distribution") or {}).get("processes", 1)
    where = f" · on GPU {run.devices}" if run.devices and run.devices != "cpu" else " · on CPU" if run.devices else ""
    return where + (f" · {processes} processes" if isinstance(processes, int) and processes > 1 else "")


def status_markdown(run: Run, metrics: Sequence[Metric], log: str, now: float, queue_pos: int = 0) -> str:
    """What the user needs to know about a run, and for a stopped run what to do next."""
    head = f"**{run.status.value}** · `{run.id}`"
    loss = f" · loss {run.final_loss:.4f}" if run.final_loss is not None else ""
    steps = f" · step {run.step}/{run.total_steps}" if run.total_steps else f" · step {run.step}"
    if run.status == RunStatus.QUEUED:
        return f"{head} · waiting for a free training slot or GPU ({queue_pos} run(s) ahead)."
    if run.status == RunStatus.RUNNING:
        elapsed = format_duration(run.duration_s if run.started_at else None)
        eta = format_duration(eta_seconds(run, metrics, now))
        where = devices_text(run)
        if not run.total_steps:
            return f"{head}{where} · loading the model and data · elapsed {elapsed}"
        return f"{head}{where}{steps} · elapsed {elapsed} · ETA {eta}{loss}"
    took = format_duration(run.duration_s)
    if run.status == RunStatus.COMPLETED:
        return f"{head} in {took}{steps}{loss}\n\nAdapter: `{run.adapter_dir or '-'}`"
    text = f"{head} after {took}{steps}{loss}\n\n**What happened:** {run.error or 'no reason was recorded.'}"
    if run.status == RunStatus.FAILED and log.strip():
        tail = "\n".join(log.splitlines()[-12:])
        text += f"\n\n**Last log lines:**\n```\n{tail}\n```"
    return text + "\n\nPress **Resume** to continue from the newest checkpoint, or change the form and Start again."


@dataclass
class WatchView:
    """One timer tick's output; figures, log and coach are None when nothing new was logged (left as they are)."""

    status: str
    progress: str
    figures: list | None
    log: str | None
    signature: str
    coach: str | None = None


def watch(ctx: UIContext, run_id: str | None, last_signature: str | None = None, now: float | None = None) -> WatchView:
    """Read the store for one run: cheap (no model loads), and figures rebuilt only on new points."""
    now = time.time() if now is None else now
    if not run_id:
        empty = charts.run_figures([])
        return WatchView("No run selected. Start one, or pick a run above.", progress_html(0, 0), empty, "", "", "")
    store = ctx.jobs.store
    try:
        run = store.get_run(run_id)
        if run.status == RunStatus.RUNNING:
            ctx.jobs.reconcile()  # a dead worker shows as interrupted instead of running forever
            run = store.get_run(run_id)
    except RunNotFound as err:
        return WatchView(f"**Error:** {err}", progress_html(0, 0), None, "", "", "")
    metrics = store.metrics(run_id)
    log = ctx.jobs.log_tail(run_id, 60)
    last = metrics[-1] if metrics else None
    signature = json.dumps([run_id, run.status.value, run.step, len(metrics), last and last.step, len(log)])
    fresh = signature != last_signature
    ahead = [r.id for r in store.queued_runs()].index(run_id) if run.status == RunStatus.QUEUED else 0
    return WatchView(
        status=status_markdown(run, metrics, log, now, ahead),
        progress=progress_html(run.step, run.total_steps),
        figures=charts.run_figures(metrics) if fresh else None,
        log=log if fresh else None,
        signature=signature,
        coach=coach_markdown(advice_for_run(store, run)) if fresh else None,
    )


# -- building the tab ---------------------------------------------------------------------------


def _widget(key: str, value: Any) -> gr.components.Component:
    elem_id = ELEM_IDS[key]
    field = CONFIG_FIELDS.get(key)
    info = field.metadata.get("help") if field is not None else None
    label = LABELS.get(key) or key.rpartition(".")[2].replace("_", " ").capitalize()
    kind = _annotation(key)
    if key in CHOICES:
        return gr.Dropdown(list(CHOICES[key]), value=value, label=label, info=info, elem_id=elem_id)
    if key == QLORA or kind == "bool":
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id)
    if _is_number_field(key):
        if _zero_means_none(key):
            info = f"{info} (0 = off)"
        if kind.startswith("int"):
            return gr.Number(value=value, label=label, info=info, precision=0, step=1, elem_id=elem_id)
        return gr.Number(value=value, label=label, info=info, step=STEPS.get(key, 0.01), elem_id=elem_id)
    return gr.Textbox(value=value, label=label, info=info, elem_id=elem_id)


def _special_widget(key: str, value: Any, ctx: UIContext) -> gr.components.Component:
    field = CONFIG_FIELDS[key]
    info, label, elem_id = field.metadata.get("help"), LABELS[key], ELEM_IDS[key]
    if key == "model.source":
        return gr.Dropdown(
            ["bundled"], value=value, label=label, info=info, allow_custom_value=True, elem_id=elem_id, scale=2
        )
    if key == "data.datasets":
        choices = sorted(set(_dataset_names(ctx)) | set(value))
        return gr.Dropdown(choices, value=value, multiselect=True, label=label, info=info, elem_id=elem_id, scale=2)
    if key == "distribution.devices":
        return gr.Dropdown(
            device_choices(), value=value, label=label, info=info, allow_custom_value=True, elem_id=elem_id
        )
    if key == "preference.start_from":
        choices = ["", *(r for r in finished_run_ids(ctx) if r != value), *([value] if value else [])]
        return gr.Dropdown(choices, value=value, label=label, info=info, allow_custom_value=True, elem_id=elem_id)
    # Target modules: a multiselect that accepts any name, so a model's own layer names always fit.
    return gr.Dropdown(
        value, value=value, multiselect=True, allow_custom_value=True, label=label, info=info, elem_id=elem_id
    )


def finished_run_ids(ctx: UIContext) -> list[str]:
    """Completed runs, newest first: what a run can start from (preference.start_from)."""
    return [r.id for r in ctx.jobs.store.list_runs(RunStatus.COMPLETED) if r.adapter_dir]


def stage_fields(stage: str | None) -> set[str]:
    """The form keys shown for a stage: its Stage.form_fields and the UI's own toggles."""
    from studio.training.stages import get_stage

    try:
        fields = get_stage(stage or "sft").form_fields
    except ValueError:
        fields = get_stage("sft").form_fields
    return {*fields, TARGET_GROUP, QLORA}


def stage_updates(stage: str | None) -> list:
    """Showing the fields of a newly picked stage: one update per FORM_KEYS entry, then the preference
    section's."""
    shown = stage_fields(stage)
    return [*(gr.update(visible=key in shown) for key in FORM_KEYS), gr.Accordion(visible=stage not in (None, "sft"))]


def device_choices(gpus: Sequence[int] | None = None) -> list[str]:
    """'auto', each GPU alone, then the first 2, 4, ... and all of them: the usual ways to pick GPUs (any
    other list can be typed)."""
    if gpus is None:
        from studio.training.launch import DistributedError, visible_gpus

        try:
            gpus = visible_gpus()
        except DistributedError:
            gpus = []
    ids = [str(i) for i in gpus]
    groups = [",".join(ids[:n]) for n in (2, 4, 8) if n < len(ids)]
    return ["auto", *ids, *groups, *([",".join(ids)] if len(ids) > 1 else [])]


def _dataset_names(ctx: UIContext) -> list[str]:
    from studio.data import DataError

    try:
        return [e.name for e in ctx.registry().list()]
    except (DataError, OSError):
        return []


def _initial_config() -> tuple[RunConfig, str | None]:
    from studio.core.presets import load_preset

    names = preset_choices()
    name = "quick-demo" if "quick-demo" in names else None
    return (load_preset(name) if name else RunConfig()), name


def _skip_none(*values: Any) -> tuple:
    return tuple(gr.skip() if v is None else v for v in values)


# -- what the tab's handlers do (module level, callable without a page) ---------------------------


def refresh_model(source, trust, group, targets) -> tuple:
    """The model's layers, the target multiselect's update and the model timer (on only while the bundled
    model is prepared). Never waits for that conversion (bundled_note)."""
    from studio.model.loading import ModelError

    waiting = gr.Timer(active=bundled_note(source) == PREPARING_NOTE)
    try:
        names = model_layers(source, trust)
    except (ModelError, ImportError, OSError, ValueError) as err:
        gr.Warning(str(err))
        return [], gr.update(), waiting
    return names, gr.update(choices=names, value=group_targets(group, names, targets)), waiting


def model_tick(preset_name: str | None, *values: Any) -> tuple:
    """Every 2 s while the bundled model is prepared: nothing; once it is ready (or failed), the model's
    layers and the views, once, and the timer stops."""
    source = form_value(values, "model.source")
    if bundled_note(source) == PREPARING_NOTE:
        return tuple(gr.skip() for _ in range(6))  # layers, targets, timer, then the three views
    trust, group, current = (
        form_value(values, k) for k in ("model.trust_remote_code", TARGET_GROUP, "lora.target_modules")
    )
    names, targets_update, _ = refresh_model(source, trust, group, current)
    values = list(values)
    if "value" in targets_update:
        values[FORM_KEYS.index("lora.target_modules")] = targets_update["value"]
    return names, targets_update, gr.Timer(active=False), *form_views(preset_name, *values)


def qlora_toggle(on: bool) -> tuple:
    """The QLoRA checkbox sets (mode, quant type, double quant); turned off it only clears the mode."""
    return ("4bit", "nf4", True) if on else ("none", gr.skip(), gr.skip())


def preset_form(name: str, datasets: Sequence[str], layers: Sequence[str]) -> list:
    """A picked preset's form values and an empty message; on a bad preset the form stays and the message
    says why."""
    try:
        return [*apply_preset(name, datasets, layers), ""]
    except ConfigError as err:
        return [*(gr.skip() for _ in FORM_KEYS), error_message(err)]


def save_preset_and_list(name: str, *values: Any) -> tuple:
    # no docstring: a named endpoint's handler's docstring becomes its API description
    return save_form_preset(name, values), gr.update(choices=preset_choices())


def start_and_watch(ctx: UIContext, *values: Any) -> tuple:
    """Start: the message, and the new run to watch (left as it is when nothing started)."""
    text, run_id = start_training(ctx, values)
    return text, gr.skip() if run_id is None else run_id


def sweep_and_watch(ctx: UIContext, param, values_text, param2, values2_text, steps, *values: Any) -> tuple:
    text, run_id = start_sweep(ctx, param, values_text, param2, values2_text, steps, values)
    return text, gr.skip() if run_id is None else run_id


def runs_update(ctx: UIContext, current: str | None) -> dict:
    """The run picker's choices; it keeps the watched run, else the newest active (a reload re-attaches)."""
    runs = ctx.jobs.store.list_runs()
    return gr.update(choices=run_choices(runs), value=current or default_run(runs))


def watch_outputs(ctx: UIContext, run_id: str | None, last: str | None, n_plots: int) -> tuple:
    """One watch tick as the outputs: status, progress, the plots, log, coach (skipped when unchanged), signature."""
    view = watch(ctx, run_id, last)
    figures: list = view.figures or [None] * n_plots
    if view.figures:  # the rewards chart shows only for a run that logs rewards (a preference stage)
        figures[-1] = gr.update(value=figures[-1], visible=bool(figures[-1].data))
    return view.status, view.progress, *_skip_none(*figures, view.log, view.coach), view.signature


def start_from_update(ctx: UIContext, current: str | None) -> dict:
    """The runs a preference run can start from, newest first (the current pick kept)."""
    ids = finished_run_ids(ctx)
    return gr.update(choices=["", *ids, *([current] if current and current not in ids else [])])


def lists_update(ctx: UIContext, run_id: str | None, current: Sequence[str] | None) -> tuple:
    """On page load and tab selection: the registered datasets (the chosen ones kept) and the runs."""
    datasets = gr.update(choices=sorted(set(_dataset_names(ctx)) | set(current or [])))
    return datasets, runs_update(ctx, run_id)


# -- building the tab ----------------------------------------------------------------------------


PLOT_IDS = ("loss-plot", "lr-plot", "gradnorm-plot", "speed-plot", "memory-plot", "pref-plot")


@dataclass
class TrainPage:
    """The tab's components: w holds one widget per FORM_KEYS entry."""

    w: dict[str, gr.components.Component]
    layers: gr.State
    preset: gr.Dropdown
    params: gr.Markdown
    plan: gr.Markdown
    command: gr.Code = None
    preset_save_name: gr.Textbox = None
    preset_save: gr.Button = None
    start: gr.Button = None
    abort: gr.Button = None
    resume: gr.Button = None
    message: gr.Markdown = None
    sweep_inputs: list = dataclasses.field(default_factory=list)
    sweep_start: gr.Button = None
    run: gr.Dropdown = None
    watch_outputs: list = dataclasses.field(default_factory=list)
    signature: gr.State = None
    model_timer: gr.Timer = None
    preference_section: gr.Accordion = None

    @property
    def form(self) -> list:
        return [self.w[k] for k in FORM_KEYS]

    @property
    def views(self) -> list:
        return [self.params, self.plan, self.command]

    @property
    def model_inputs(self) -> list:
        w = self.w
        return [w["model.source"], w["model.trust_remote_code"], w[TARGET_GROUP], w["lora.target_modules"]]

    @property
    def model_outputs(self) -> list:
        return [self.layers, self.w["lora.target_modules"], self.model_timer]


def _top_rows(ctx: UIContext, initial: dict[str, Any], preset_name: str | None) -> TrainPage:
    """Model, preset, datasets and name; trust-remote-code and the parameter count; the memory plan."""
    w: dict[str, gr.components.Component] = {}
    layers = gr.State([])
    with gr.Row():
        w["model.source"] = _special_widget("model.source", initial["model.source"], ctx)
        preset = gr.Dropdown(preset_choices(), value=preset_name, label="Preset", elem_id="train-preset", scale=1)
        w["data.datasets"] = _special_widget("data.datasets", initial["data.datasets"], ctx)
        w["stage"] = _widget("stage", initial["stage"])
        w["name"] = _widget("name", initial["name"])
    with gr.Row():
        w["model.trust_remote_code"] = _widget("model.trust_remote_code", initial["model.trust_remote_code"])
        params = gr.Markdown("Trainable parameters: reading the model...", elem_id="train-params")
    with gr.Accordion("Memory: will it fit?", open=True):
        plan = gr.Markdown("Memory estimate: reading the model...", elem_id="train-plan")
    return TrainPage(w, layers, preset, params, plan)


def _form_sections(ctx: UIContext, page: TrainPage, initial: dict[str, Any]) -> None:
    """One open accordion per SECTIONS entry, a widget per field; the fields the stage does not read are
    hidden (Stage.form_fields), the preference section with them."""
    shown = stage_fields(initial["stage"])
    for title, keys in SECTIONS:
        visible = title != PREFERENCE_SECTION or initial["stage"] != "sft"
        with gr.Accordion(title, open=True, visible=visible) as section, gr.Row(equal_height=False):
            for key in keys:
                if key in ("lora.target_modules", "distribution.devices", "preference.start_from"):
                    page.w[key] = _special_widget(key, initial[key], ctx)
                else:
                    page.w[key] = _widget(key, initial[key])
                page.w[key].visible = key in shown
        if title == PREFERENCE_SECTION:
            page.preference_section = section


def _run_controls(page: TrainPage, cfg: RunConfig, preset_name: str | None) -> None:
    """The CLI/YAML box, saving a preset, Start / Abort / Resume and the message line."""
    with gr.Accordion("CLI command and YAML", open=True):
        page.command = gr.Code(command_text(cfg, preset_name), language="yaml", elem_id="train-command")
    with gr.Row():
        page.preset_save_name = gr.Textbox(label="Save the form as preset", elem_id="preset-save-name", scale=3)
        page.preset_save = gr.Button("Save preset", elem_id="preset-save", scale=1)
    with gr.Row():
        page.start = gr.Button("Start", variant="primary", elem_id="train-start")
        page.abort = gr.Button("Abort", variant="stop", elem_id="train-abort")
        page.resume = gr.Button("Resume", elem_id="train-resume")
    page.message = gr.Markdown(elem_id="train-message")


def _sweep_controls(page: TrainPage) -> None:
    with gr.Accordion("Sweep: scan a parameter with short runs, then train the pick longer", open=False):
        gr.Markdown(
            "One short run per value, smallest first, each with the form's settings and the scan length below. "
            "Practitioners scan ranks 8, 16, 32, 64 on a few hundred steps, look for the knee, then train the "
            "best one longer. Scanning `lora.r` alone keeps the form's alpha/r ratio. Use a validation split "
            "(Data: val size) so the pick is made on eval loss."
        )
        with gr.Row():
            param = gr.Dropdown(list(SWEEPABLE), value="lora.r", label="Parameter", elem_id="sweep-param", scale=1)
            values = gr.Textbox(value="8,16,32,64", label="Values", elem_id="sweep-values", scale=2)
            param2 = gr.Dropdown(
                [NO_SECOND_PARAM, *SWEEPABLE],
                value=NO_SECOND_PARAM,
                label="Second parameter (grid)",
                elem_id="sweep-param2",
                scale=1,
            )
            values2 = gr.Textbox(value="", label="Values", elem_id="sweep-values2", scale=2)
            steps = gr.Number(
                value=DEFAULT_SCAN_STEPS, precision=0, label="Scan steps per run", elem_id="sweep-steps", scale=1
            )
        page.sweep_start = gr.Button("Queue sweep", elem_id="sweep-start")
    page.sweep_inputs = [param, values, param2, values2, steps, *page.form]


def _watch_panel(page: TrainPage) -> None:
    """The watched run: its status, progress, coach, plots and log."""
    page.run = gr.Dropdown([], value=None, label="Watching run", allow_custom_value=True, elem_id="train-run")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.HTML(progress_html(0, 0), elem_id="train-progress")
    coach = gr.Markdown(elem_id="train-coach")
    with gr.Row():
        plots = [gr.Plot(label="loss", elem_id="loss-plot")]
        rewards = gr.Plot(label="rewards", elem_id="pref-plot", visible=False)  # preference runs only
    with gr.Row():
        plots += [gr.Plot(label=i.split("-")[0], elem_id=i) for i in PLOT_IDS[1:-1]]
    plots.append(rewards)
    log = gr.Textbox(label="Log", lines=12, max_lines=12, autoscroll=True, elem_id="train-log")
    page.signature = gr.State("")
    page.watch_outputs = [status, progress, *plots, log, coach, page.signature]


def _wire_form_views(page: TrainPage) -> None:
    """Parameter count, memory plan and CLI/YAML box follow the form: one handler for all three, fired by
    user edits of the multiselects (.input) and by .change of the rest. Separate handlers sharing the
    multiselect inputs re-fired its .change after every response (gradio 6.31), a request loop that kept a
    core busy while the tab was open and slowed training ~7x."""
    w, multiselects = page.w, ("lora.target_modules", "data.datasets")
    triggers = [w[k].input if k in multiselects else w[k].change for k in FORM_KEYS]
    inputs = [page.preset, *page.form]
    gr.on([*triggers, page.preset.change], form_views, inputs, page.views, trigger_mode="always_last", api_name=False)


def _then_views(page: TrainPage, event) -> None:
    """Programmatic changes fire no .input: refresh the views after them explicitly."""
    event.then(form_views, [page.preset, *page.form], page.views, api_name=False)


def _wire_model(page: TrainPage) -> None:
    """Model, targets and parameter count. While the bundled model is prepared the targets are its known
    layers, and model_timer (on only then) reads the model once it is ready, then turns itself off."""
    w, targets = page.w, page.w["lora.target_modules"]
    _then_views(page, w["model.source"].change(refresh_model, page.model_inputs, page.model_outputs, api_name=False))
    page.model_timer.tick(
        model_tick,
        [page.preset, *page.form],
        [*page.model_outputs, *page.views],
        api_name=False,
        show_progress="hidden",
    )
    group = w[TARGET_GROUP]
    _then_views(page, group.input(group_targets, [group, page.layers, targets], targets, api_name=False))
    targets.input(group_for_targets, [targets, page.layers], group, api_name=False)


def _wire_quant_and_presets(page: TrainPage) -> None:
    """The QLoRA toggle and the quantization dropdown stay in step; presets load and save."""
    w = page.w
    quant_outs = [w["quant.mode"], w["quant.quant_type"], w["quant.double_quant"]]
    w[QLORA].input(qlora_toggle, w[QLORA], quant_outs, api_name=False)
    w["quant.mode"].change(lambda mode: mode == "4bit", w["quant.mode"], w[QLORA], api_name=False)
    preset_inputs = [page.preset, w["data.datasets"], page.layers]
    _then_views(page, page.preset.input(preset_form, preset_inputs, [*page.form, page.message], api_name=False))
    save_inputs = [page.preset_save_name, *page.form]
    page.preset_save.click(save_preset_and_list, save_inputs, [page.message, page.preset], api_name="save_preset")
    # A stage shows the fields it reads (a preset can change the stage too: .change, not .input).
    w["stage"].change(stage_updates, w["stage"], [*page.form, page.preference_section], api_name=False)


def _wire_runs(ctx: UIContext, page: TrainPage) -> None:
    """Start, sweep, abort and resume, and the API endpoints for scripts."""
    run, message = page.run, page.message

    def refresh_runs(current):
        return runs_update(ctx, current)

    def on_start(*values):
        return start_and_watch(ctx, *values)

    def on_sweep(param, values_text, param2, values2_text, steps, *values):  # names: the API's parameters
        return sweep_and_watch(ctx, param, values_text, param2, values2_text, steps, *values)

    page.start.click(on_start, page.form, [message, run], api_name="start_training").then(
        refresh_runs, run, run, api_name=False
    )
    page.sweep_start.click(on_sweep, page.sweep_inputs, [message, run], api_name="start_sweep").then(
        refresh_runs, run, run, api_name=False
    )
    page.abort.click(lambda run_id: abort_run(ctx, run_id), run, message, api_name="abort_run")
    page.resume.click(lambda run_id: resume_run(ctx, run_id), run, message, api_name="resume_run").then(
        refresh_runs, run, run, api_name=False
    )

    def api_run_status(run_id: str) -> dict:
        return run_status(ctx, run_id)

    def api_start_preset_run(preset: str, datasets: str, max_steps: int = 0, run_name: str = "") -> tuple[str, str]:
        text, run_id = start_preset_run(ctx, preset, datasets, max_steps, run_name)
        return text, run_id or ""

    gr.api(api_run_status, api_name="run_status")
    gr.api(api_start_preset_run, api_name="start_preset_run")


def _wire_watch_and_load(ctx: UIContext, page: TrainPage, tab: gr.Tab | None) -> None:
    """The watched run redraws every second; page load (and so every reload) re-attaches to the newest active
    run and reads the model's layers: two handlers, so the datasets and runs never wait on the model."""
    n_plots = len(PLOT_IDS)

    def tick(run_id, last):
        return watch_outputs(ctx, run_id, last, n_plots)

    timer = gr.Timer(1.0)
    timer.tick(tick, [page.run, page.signature], page.watch_outputs, api_name=False, show_progress="hidden")
    # A new run to watch draws everything afresh, at once.
    page.run.change(
        lambda run_id: tick(run_id, None), page.run, page.watch_outputs, api_name=False, show_progress="hidden"
    )

    def on_load(run_id, current):
        return lists_update(ctx, run_id, current)

    lists_inputs, lists_outputs = [page.run, page.w["data.datasets"]], [page.w["data.datasets"], page.run]
    Context.root_block.load(on_load, lists_inputs, lists_outputs, api_name=False)
    _then_views(page, Context.root_block.load(refresh_model, page.model_inputs, page.model_outputs, api_name=False))
    start_from = page.w["preference.start_from"]

    def on_start_from(current):
        return start_from_update(ctx, current)

    if tab is not None:
        # New datasets registered in the Datasets tab and runs started from the CLI appear on selection.
        tab.select(on_load, lists_inputs, lists_outputs, api_name=False)
        tab.select(refresh_model, page.model_inputs, page.model_outputs, api_name=False)
        tab.select(on_start_from, start_from, start_from, api_name=False)


def build(ctx: UIContext, tab: gr.Tab | None = None) -> None:
    cfg, preset_name = _initial_config()
    initial = dict(zip(FORM_KEYS, form_from_config(cfg), strict=True))
    page = _top_rows(ctx, initial, preset_name)
    _form_sections(ctx, page, initial)
    _run_controls(page, cfg, preset_name)
    _sweep_controls(page)
    _watch_panel(page)
    page.model_timer = gr.Timer(2.0, active=False)
    _wire_form_views(page)
    _wire_model(page)
    _wire_quant_and_presets(page)
    _wire_runs(ctx, page)
    _wire_watch_and_load(ctx, page, tab)
