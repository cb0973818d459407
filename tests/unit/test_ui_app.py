"""The whole page builds, carries every element id the issue promises, and names its main endpoints."""

from studio.ui.app import build_app

REQUIRED_IDS = [
    "ds-upload",
    "ds-name",
    "ds-format",
    "ds-register",
    "ds-preview",
    "ds-message",
    "train-model",
    "train-preset",
    "train-dataset",
    "train-stage",
    "pref-beta",
    "pref-loss",
    "pref-start-from",
    "lora-r",
    "lora-alpha",
    "lora-dropout",
    "lora-targets",
    "compute-type",
    "qlora",
    "train-lr",
    "train-max-steps",
    "train-start",
    "train-abort",
    "train-status",
    "train-progress",
    "loss-plot",
    "train-log",
    "train-command",
    "runs-table",
    "chat-adapter",
    "chat-load",
    "chat-input",
    "chat-send",
    "chatbot",
    "chat-compare",
    "export-run",
    "export-merge",
    "export-message",
    # issue 7: sweeps, the coach, evaluation, the dataset doctor, run cards
    "sweep-param",
    "sweep-values",
    "sweep-steps",
    "sweep-start",
    "sweep-select",
    "sweep-table",
    "sweep-plot",
    "sweep-pick",
    "sweep-promote",
    "train-coach",
    "runs-coach",
    "runs-card",
    "train-early-stopping",
    "train-stop-on-divergence",
    "eval-run",
    "eval-dataset",
    "eval-start",
    "eval-status",
    "eval-table",
    "eval-examples",
    "doctor-run",
    "doctor-summary",
    "doctor-findings",
    "doctor-fix-name",
    "doctor-fix",
]

REQUIRED_ENDPOINTS = {
    "register_dataset",
    "check_dataset",
    "list_datasets",
    "start_training",
    "start_preset_run",
    "run_status",
    "abort_run",
    "resume_run",
    "list_runs",
    "chat",
    "chat_load",
    "export_merged",
    "export_adapter",
    "start_sweep",
    "sweep_summary",
    "promote_sweep",
    "run_card",
    "evaluate_run",
    "dataset_doctor",
    "dataset_doctor_fix",
}


def test_every_promised_elem_id_exists_once(home):
    app = build_app(home)
    ids = [block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)]
    missing = [i for i in REQUIRED_IDS if i not in ids]
    assert not missing, missing
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, dupes


def test_main_endpoints_are_named(home):
    app = build_app(home)
    names = {fn.api_name for fn in app.fns.values() if fn.api_name}
    assert names >= REQUIRED_ENDPOINTS, REQUIRED_ENDPOINTS - names
