"""The one pre-submit check: everything that can be known to be wrong with a run before it exists (its
values, its datasets, its model and LoRA targets, the devices it asks for), each as a Problem, all at
once. The queue's submit, a sweep's submit and `studio join` ask it, so a run is refused the same way
wherever it comes from, and nothing is created for a run that would fail on its first step."""

from __future__ import annotations

import json
from pathlib import Path

from studio.core.config import RunConfig
from studio.core.problems import Problem
from studio.training.launch import DistributedError, device_request, request_problems, visible_gpus


def run_problems(config: RunConfig, home: Path, devices: bool = True) -> list[Problem]:
    """Every problem of one run in this workspace; `devices=False` on a machine that joins another's run
    (its GPUs are its own launcher's business)."""
    problems = config.validate()
    problems += dataset_problems(home, config)
    problems += start_problems(home, config)
    problems += model_problems(config, problems)
    if devices:
        problems += device_problems(config, problems)
    return problems


def sweep_problems(configs: list[RunConfig], home: Path) -> list[Problem]:
    """The problems of a sweep's runs, each said once. Datasets are not sweepable (the first run's are every
    run's); the model and targets are checked once per distinct target_modules value."""
    problems = [*dataset_problems(home, configs[0]), *start_problems(home, configs[0])] if configs else []
    seen: set[str] = set()
    for config in configs:
        key = json.dumps(config.lora.target_modules)
        if key not in seen:
            seen.add(key)
            problems += [p for p in model_problems(config) if p not in problems]
    problems += [p for p in device_problems(configs[0], problems) if p not in problems] if configs else []
    return problems


def model_problems(config: RunConfig, known: list[Problem] | tuple[Problem, ...] = ()) -> list[Problem]:
    """What is wrong with the model and its LoRA targets, found from the model's config alone (no weights),
    so a bad path, an unreachable hub id or a missing layer is refused before a run exists."""
    from studio.model.loading import (
        BUNDLED_LINEAR_LAYERS,
        ModelError,
        build_skeleton,
        bundled_gguf_path,
        bundled_model_ready,
        is_bundled_source,
        load_config,
        resolve_model,
    )
    from studio.model.targets import linear_layer_names, target_problem

    if any(p.path == "model.source" for p in known):
        return []  # already reported; nothing to resolve
    available: list[str] | None = None
    if is_bundled_source(config.model.source) and not bundled_model_ready():
        # Being converted (the server prepares it in the background): its layers are known, and queueing
        # must not wait for the conversion. The worker waits for it instead.
        try:
            bundled_gguf_path()
        except ModelError as err:
            return [Problem("model.source", " ".join(str(err).split()))]
        available = list(BUNDLED_LINEAR_LAYERS)
    else:
        try:
            model_config = load_config(resolve_model(config.model.source), config.model.trust_remote_code)
        except ModelError as err:
            # transformers' reasons span lines; a problem is one line
            return [Problem("model.source", " ".join(str(err).split()))]
    if any(p.path == "lora.target_modules" for p in known):
        return []
    if available is None:
        try:
            available = linear_layer_names(build_skeleton(model_config))
        except (ValueError, KeyError) as err:  # transformers: no causal-LM class for this config
            return [
                Problem(
                    "model.source",
                    f"'{config.model.source}' is not a causal language model this version can train ({err}).",
                )
            ]
    problem = target_problem(config.lora.target_modules, available)
    return [problem] if problem else []


# The dataset formats each stage trains on (KTO also takes pairs: each gives a good and a bad answer).
STAGE_FORMATS = {"dpo": ("preference",), "orpo": ("preference",), "kto": ("kto", "preference")}


def dataset_problems(home: Path, config: RunConfig) -> list[Problem]:
    """A problem for each dataset the config names that this workspace has not registered, or whose data
    the run's stage cannot train on (preference pairs for SFT, instructions for DPO...)."""
    from studio.data import DataError, DatasetRegistry
    from studio.data.preference import PREFERENCE_FORMATS

    registry = DatasetRegistry(home)
    problems = []
    for name in config.data.datasets:
        try:
            entry = registry.get(name)
        except (DataError, KeyError):
            text = f"Dataset '{name}' is not registered. Register it first (studio datasets add)."
            problems.append(Problem("data.datasets", text))
            continue
        wanted = STAGE_FORMATS.get(config.stage)
        if wanted is None and entry.format in PREFERENCE_FORMATS:
            problems.append(
                Problem(
                    "data.datasets",
                    f"Dataset '{name}' holds {entry.format} data (answers judged better or worse), which "
                    f"supervised fine-tuning cannot learn from. Set stage to {_stages_for(entry.format)}, or pick "
                    "an instruction or chat dataset.",
                )
            )
        elif wanted is not None and entry.format not in wanted:
            needs = (
                "answers labelled good or bad (format kto) or pairs"
                if config.stage == "kto"
                else "pairs of a chosen and a rejected answer"
            )
            problems.append(
                Problem(
                    "data.datasets",
                    f"Dataset '{name}' is {entry.format} data, one answer per prompt; stage {config.stage} trains "
                    f"on {needs}. Pick a preference dataset, or set stage to sft.",
                )
            )
    return problems


def _stages_for(fmt: str) -> str:
    return "kto" if fmt == "kto" else "dpo (or orpo, kto)"


def start_problems(home: Path, config: RunConfig) -> list[Problem]:
    """What is wrong with the run named in preference.start_from: unknown, unfinished, or trained on
    another base model (its adapter would not fit this one)."""
    from studio.core.store import RunNotFound, RunStatus, Store
    from studio.core.workspace import RunDir, db_path

    run_id = (config.preference.start_from or "").strip() if isinstance(config.preference.start_from, str) else ""
    if not run_id:
        return []
    path = "preference.start_from"
    try:
        run = Store(db_path(home)).get_run(run_id)
    except RunNotFound:
        return [Problem(path, f"There is no run '{run_id}' to start from. Pick a finished run (studio runs).")]
    if run.status != RunStatus.COMPLETED or not RunDir.is_adapter(run.adapter_dir):
        return [
            Problem(path, f"Run '{run_id}' is {run.status.value}: only a completed run has an adapter to start from.")
        ]
    theirs = str((run.config.get("model") or {}).get("source") or "bundled")
    if not same_model(theirs, config.model.source):
        return [
            Problem(
                path,
                f"Run '{run_id}' trained an adapter for '{theirs}', and this run's model is "
                f"'{config.model.source or 'bundled'}': an adapter only fits the base it was trained on. Pick a "
                "run on this model, or set model.source to its base.",
            )
        ]
    return []


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model sources name the same model ('' and 'bundled' do; folders compare resolved)."""

    def norm(source: str | None) -> str:
        source = (source or "").strip() or "bundled"
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source

    return norm(a) == norm(b)


def device_problems(config: RunConfig, known: list[Problem]) -> list[Problem]:
    """A run asking for GPUs this machine does not have would wait forever in the queue."""
    if any(p.path == "distribution.devices" for p in known):
        return []
    try:
        gpus = visible_gpus()
    except DistributedError as err:
        return [Problem("", str(err))]
    return request_problems(device_request(config, bool(gpus)), gpus)
