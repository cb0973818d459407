"""Run cards: the SVG charts are valid and faithful, the Markdown carries every fact, write_card puts the
card beside the adapter (or in RUN_DIR/card without one), and the adapter export keeps it."""

from __future__ import annotations

import argparse
import json
import math
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import yaml

from studio.cli.card import add_arguments, run_cli
from studio.core.config import RunConfig
from studio.core.store import Metric, Run, RunStatus, Store
from studio.reports.card import (
    CardError,
    base_model_info,
    card_charts,
    format_tick,
    nice_ticks,
    render_card,
    reproduce_command,
    svg_line_chart,
    write_card,
)

SVG = "{http://www.w3.org/2000/svg}"


# -- fixtures: a synthetic finished run ---------------------------------------------------------------


def make_config(**data) -> dict:
    cfg = RunConfig(name="facts-demo")
    cfg.data.datasets = ["studio-facts"]
    cfg.data.val_size = 0.1
    cfg.train.max_steps = 30
    for key, value in data.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg.to_dict()


def make_run(status=RunStatus.COMPLETED, run_dir="/w/runs/r1", **fields) -> Run:
    config = fields.pop("config", None) or make_config()
    return Run(
        id="r1",
        name="facts-demo",
        status=status,
        config=config,
        model=config["model"]["source"],
        datasets="studio-facts",
        run_dir=run_dir,
        created_at=1.7e9,
        started_at=1.7e9,
        finished_at=1.7e9 + 95,
        step=30,
        total_steps=30,
        final_loss=0.4321,
        adapter_dir=f"{run_dir}/adapter" if status == RunStatus.COMPLETED else None,
        **fields,
    )


def make_metrics(n: int = 30) -> list[Metric]:
    metrics = [
        Metric(step=i, time=0.0, loss=3.0 / i, learning_rate=2e-4 * i / n, grad_norm=1.0, tokens_per_s=200.0)
        for i in range(1, n + 1)
    ]
    metrics[9].eval_loss, metrics[19].eval_loss = 1.5, 1.2345
    return metrics


def make_run_json(config: dict | None = None) -> dict:
    return {
        "base_model": {
            "kind": "bundled",
            "name": "SmolLM2-135M-Instruct",
            "path": "/cache/smollm2",
            "source": "bundled",
        },
        "config": config or make_config(),
        "global_step": 30,
        "final_loss": 0.4321,
        "train_samples": 36,
        "eval_samples": 4,
        "trainable_parameters": 4884480,
        "seconds": 95.2,
        "tokens_per_s": 201.3,
        "real_tokens": 12000,
        "padding_share": 0.12,
        "peak_memory_mb": 1934.4,
    }


def make_eval(examples: int = 7) -> dict:
    return {
        "run_id": "r1",
        "dataset": "validation split",
        "samples": 4,
        "created_at": 1.7e9,
        "loss": {"base": 2.5, "adapter": 1.1},
        "perplexity": {"base": 12.18, "adapter": 3.0},
        "generation": {
            "prompts": 4,
            "max_new_tokens": 64,
            "base": {"exact_match": 0.0, "chrf": 20.1, "rouge_l": 0.2},
            "adapter": {"exact_match": 0.5, "chrf": 60.3, "rouge_l": 0.7},
        },
        "examples": [
            {"prompt": f"Question {i}?", "reference": "Ripple", "base": f"base says {i}", "adapter": f"tuned says {i}"}
            for i in range(examples)
        ],
    }


ENTRY = {"name": "studio-facts", "format": "alpaca", "rows": 40, "sha256": "abcdef0123456789ffff"}


def card(run=None, metrics=None, run_json="default", eval_report=None, warnings=(), entries=(ENTRY,)) -> str:
    run = run or make_run()
    run_json = make_run_json(run.config) if run_json == "default" else run_json
    return render_card(
        run,
        make_metrics() if metrics is None else metrics,
        run_json,
        eval_report,
        list(entries),
        reproduce_command(run.run_dir),
        list(warnings),
    )


def section(md: str, title: str) -> str:
    """The body of one '## title' section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def headings(md: str) -> list[str]:
    """The '## ' headings a Markdown renderer sees: lines inside fenced code blocks do not count."""
    found, fence = [], ""
    for line in md.splitlines():
        ticks = re.match(r"^(`{3,})", line)
        if ticks and (not fence or (ticks.group(1) == fence and line.strip() == fence)):
            fence = "" if fence else ticks.group(1)
        elif not fence and line.startswith("## "):
            found.append(line[3:])
    return found


def table_row(md: str, label: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no table row {label!r}")


# -- SVG charts ---------------------------------------------------------------------------------------


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    return [
        [tuple(map(float, p.split(","))) for p in line.get("points").split()] for line in root.iter(f"{SVG}polyline")
    ]


def texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


def test_chart_is_standalone_svg_with_one_polyline_per_series_skipping_gaps():
    train = [(1, 3.0), (2, None), (3, float("nan")), (4, 1.0), (5, 0.5), (6, float("inf"))]
    evals = [(2, 2.0), (4, 1.5), (6, 1.4)]
    svg = svg_line_chart({"train": train, "eval": evals}, "Loss", "step", "loss")
    root = ET.fromstring(svg)  # parses: valid XML
    assert root.tag == f"{SVG}svg" and root.get("width") == "640" and root.get("height") == "320"
    lines = polylines(svg)
    assert [len(points) for points in lines] == [3, 3]  # NaN, None and inf skipped
    # Both axes run the right way: a falling loss goes down the page (larger y) as steps go right.
    xs, ys = zip(*lines[0], strict=True)
    assert xs == tuple(sorted(xs)) and ys == tuple(sorted(ys))
    assert {"Loss", "step", "loss", "train", "eval"} <= set(texts(svg))  # title, axis labels, legend


def test_points_stay_inside_the_plot_and_ticks_are_round():
    svg = svg_line_chart({"lr": [(i, 2e-4 * i / 30) for i in range(1, 31)]}, "Learning rate", "step", "lr")
    (points,) = polylines(svg)
    assert all(0 <= x <= 640 and 0 <= y <= 320 for x, y in points)
    labels = texts(svg)
    assert {"0", "10", "20", "30"} <= set(labels)
    assert {"5e-5", "1e-4", "1.5e-4", "2e-4"} <= set(labels)


def test_a_single_point_is_a_dot_and_no_points_say_no_data():
    one = svg_line_chart({"eval loss": [(5, 0.5)]}, "Eval", "step", "loss")
    root = ET.fromstring(one)
    assert not polylines(one) and len(list(root.iter(f"{SVG}circle"))) == 1

    for empty in ({}, {"loss": []}, {"loss": [(1, None), (2, float("nan"))]}):
        svg = svg_line_chart(empty, "Training loss", "step", "loss")
        root = ET.fromstring(svg)
        assert "no data" in texts(svg) and not polylines(svg) and not list(root.iter(f"{SVG}circle"))


def test_chart_text_is_escaped():
    svg = svg_line_chart({'a<b> & "c"': [(0, 1), (1, 2)], "d\x01": [(0, 2), (1, 1)]}, "<script>&", "x", "y")
    assert "<script>" not in svg
    labels = texts(svg)  # parses even with markup and control characters in the names
    assert "<script>&" in labels and 'a<b> & "c"' in labels and "d" in labels


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0, 30, [0, 10, 20, 30]),
        (1, 4, [1, 2, 3, 4]),
        (0.43, 3.0, [0, 1, 2, 3]),
        (0, 2e-4, [0, 5e-5, 1e-4, 1.5e-4, 2e-4]),
        (5, 5, [4.5, 5.0, 5.5]),
        (0.1, 0.3, [0.1, 0.15, 0.2, 0.25, 0.3]),
    ],
)
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi, expected):
    ticks = nice_ticks(lo, hi)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_tick_labels():
    assert format_tick(0.30000000000000004, 0.1) == "0.3"
    assert format_tick(1.5e-4, 5e-5) == "1.5e-4"
    assert format_tick(20.0, 10) == "20"
    assert format_tick(0.0, 0.5) == "0"


def test_card_charts_follow_what_was_logged():
    charts = card_charts(make_metrics())
    assert [c.file for c in charts] == ["loss.svg", "learning_rate.svg", "grad_norm.svg"]
    loss = charts[0]
    assert loss.alt == "Training and eval loss"
    assert [len(p) for p in polylines(loss.svg)] == [30, 2]  # train at every step, eval at two
    only_loss = card_charts([Metric(step=1, time=0, loss=2.0), Metric(step=2, time=0, loss=1.5)])
    assert [(c.file, c.alt) for c in only_loss] == [("loss.svg", "Training loss")]
    assert card_charts([]) == []


# -- the Markdown -------------------------------------------------------------------------------------


SECTIONS = [
    "Base model",
    "Data",
    "Hyperparameters",
    "Training",
    "Curves",
    "Evaluation",
    "Notes",
    "How to reproduce",
]


def test_card_has_front_matter_title_and_every_section_in_order():
    md = card(eval_report=make_eval(), warnings=["Loss is still falling: train longer."])
    assert md.startswith("---\n")
    meta = yaml.safe_load(md.split("---\n")[1])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["lora", "lora-studio"]
    assert "\n# facts-demo\n" in md
    assert headings(md) == SECTIONS
    summary = md.split("# facts-demo\n\n")[1].splitlines()[0]
    assert "r=16" in summary and "studio-facts" in summary and "30 steps" in summary and "0.4321" in summary


def test_numbers_are_formatted_for_people():
    md = card()
    hyper = section(md, "Hyperparameters")
    assert table_row(hyper, "LoRA rank r") == ["16"]
    assert table_row(hyper, "alpha") == ["32 (scale 2.000)"]
    assert table_row(hyper, "learning rate") == ["2e-4"]
    assert table_row(hyper, "batch") == ["4 × 4 accumulation = 16 per update"]
    assert table_row(hyper, "length") == ["max_steps 30"]
    assert table_row(hyper, "target modules") == ["`all-linear`"]
    assert table_row(hyper, "quantization") == ["none"]
    assert table_row(hyper, "seed") == ["42"]
    train = section(md, "Training")
    assert table_row(train, "steps") == ["30 of 30"]
    assert table_row(train, "final train loss") == ["0.4321"]
    assert table_row(train, "final eval loss") == ["1.2345"]
    assert table_row(train, "time") == ["1 min 35 s"]
    assert table_row(train, "tokens / s") == ["201"]
    assert table_row(train, "peak memory") == ["1,934 MB"]
    assert table_row(train, "trainable parameters") == ["4,884,480"]
    data = section(md, "Data")
    assert table_row(data, "studio-facts") == ["alpaca", "40", "`abcdef012345`"]
    assert "cutoff 512 tokens" in data and "10% held out" in data and "36 train / 4 eval samples" in data


def test_qlora_and_variants_show_in_the_table_and_tags():
    config = make_config(quant__mode="4bit", quant__compute_dtype="bf16", lora__use_rslora=True, lora__use_dora=True)
    md = card(run=make_run(config=config))
    hyper = section(md, "Hyperparameters")
    assert table_row(hyper, "quantization") == ["4-bit nf4, double quant, compute bf16"]
    assert table_row(hyper, "init") == ["default + rsLoRA, DoRA"]
    assert table_row(hyper, "alpha") == [f"32 (scale {32 / math.sqrt(16):.3f})"]
    assert "- qlora" in md.split("---")[1]


def test_curves_link_the_images():
    curves = section(card(), "Curves")
    assert "![Training and eval loss](card/loss.svg)" in curves
    assert "![Learning rate](card/learning_rate.svg)" in curves
    assert "No metrics" in section(card(metrics=[]), "Curves")


def test_evaluation_table_compares_base_and_adapter():
    md = card(eval_report=make_eval())
    ev = section(md, "Evaluation")
    assert table_row(ev, "loss ↓") == ["2.5000", "1.1000", "-1.4 (better)"]
    assert table_row(ev, "perplexity ↓") == ["12.1800", "3.0000", "-9.18 (better)"]
    assert table_row(ev, "exact match ↑") == ["0.0000", "0.5000", "+0.5 (better)"]
    assert table_row(ev, "chrF ↑") == ["20.1000", "60.3000", "+40.2 (better)"]
    assert table_row(ev, "ROUGE-L ↑") == ["0.2000", "0.7000", "+0.5 (better)"]
    assert "validation split" in ev and "4 samples" in ev and "64 new tokens" in ev
    assert ev.count("### Example") == 5  # seven in the report, five shown
    assert "tuned says 4" in ev and "tuned says 5" not in ev


def test_evaluation_tolerates_missing_parts():
    assert "Not evaluated yet" in section(card(eval_report=None), "Evaluation")
    partial = {"loss": {"base": 2.0, "adapter": 2.5}, "perplexity": {"adapter": "oops"}, "generation": None}
    ev = section(card(eval_report=partial), "Evaluation")
    assert table_row(ev, "loss ↓") == ["2.0000", "2.5000", "+0.5 (worse)"]
    assert "perplexity" not in ev and "chrF" not in ev and "### Example" not in ev


def test_example_text_cannot_break_out_of_its_code_block():
    report = make_eval(0)
    report["examples"] = [{"prompt": "```\n## Injected\n```", "reference": "r", "base": "b", "adapter": "a"}]
    md = card(eval_report=report)
    assert headings(md) == [s for s in SECTIONS if s != "Notes"]
    assert "````\n```\n## Injected\n```\n````" in md


def test_the_exact_command_and_a_loading_snippet():
    repro = section(card(), "How to reproduce")
    assert "```bash\nstudio train /w/runs/r1/config.yaml\n```" in repro
    assert 'PeftModel.from_pretrained(base, "/w/runs/r1/adapter")' in repro
    assert 'AutoModelForCausalLM.from_pretrained("/cache/smollm2")' in repro
    config_block = repro.split("```yaml\n")[1].split("```")[0]
    assert RunConfig.from_yaml(config_block).to_dict() == make_config()  # the whole config, round-trips
    assert reproduce_command("/w/my runs/r1") == "studio train '/w/my runs/r1/config.yaml'"


def test_notes_list_warnings_once_and_the_error_without_the_log_tail():
    md = card(warnings=["Loss is flat.", "Loss is flat.", "Paging needs CUDA | falls back"])
    notes = section(md, "Notes")
    assert notes.count("Loss is flat.") == 1 and "Paging needs CUDA | falls back" in notes
    assert "## Notes" not in card(warnings=[])

    failed = make_run(RunStatus.FAILED, error="Out of memory. Lower batch.\n\n--- last log lines ---\nTraceback ...")
    md = card(run=failed, run_json=None, warnings=["Out of memory. Lower batch."])
    notes = section(md, "Notes")
    assert notes.count("Out of memory") == 1 and "Traceback" not in notes


def test_a_run_without_adapter_says_so_and_offers_no_loading_snippet():
    run = make_run(RunStatus.ABORTED, error="Aborted by request; resume continues from checkpoint-10")
    md = card(run=run, run_json=None)
    assert "No adapter exists for this run" in md and "aborted" in md
    repro = section(md, "How to reproduce")
    assert "studio train /w/runs/r1/config.yaml" in repro and "PeftModel" not in repro
    assert table_row(section(md, "Training"), "status") == ["aborted"]


def test_local_and_hub_bases():
    local = make_run(config=make_config(model__source="/models/tiny"))
    rj = make_run_json(local.config)
    rj["base_model"] = {"kind": "local", "name": "tiny", "path": "/models/tiny", "source": "/models/tiny"}
    meta = yaml.safe_load(card(run=local, run_json=rj).split("---\n")[1])
    assert "base_model" not in meta and "license" not in meta  # a local path is no hub id
    hub = make_run(config=make_config(model__source="org/model"))
    info = base_model_info(hub, None)
    assert (info.kind, info.hub_id) == ("unknown", None)
    rj = make_run_json(hub.config)
    rj["base_model"] = {"kind": "hub", "name": "org/model", "path": "org/model", "source": "org/model"}
    md = card(run=hub, run_json=rj)
    assert yaml.safe_load(md.split("---\n")[1])["base_model"] == "org/model"
    assert 'AutoModelForCausalLM.from_pretrained("org/model")' in md


def test_missing_dataset_and_pipes_in_cells():
    md = card(entries=[{"name": "gone", "missing": True}])
    assert table_row(section(md, "Data"), "gone") == ["—", "—", "not registered any more"]
    run = make_run(config=make_config(lora__target_modules=["q_proj", "v_proj"]))
    assert table_row(section(card(run=run), "Hyperparameters"), "target modules") == ["`q_proj, v_proj`"]


# -- write_card on disk -------------------------------------------------------------------------------


def seed_run(home: Path, status=RunStatus.COMPLETED, with_adapter=True, with_eval=True) -> Run:
    """A run in the store with metrics and events, and its folder as training leaves it."""
    store = Store(home / "studio.db")
    run_dir = home / "runs" / "r1"
    (run_dir / "adapter").mkdir(parents=True)
    config = make_config()
    store.create_run("r1", "facts-demo", config, str(run_dir))
    store.transition("r1", RunStatus.RUNNING)
    for m in make_metrics():
        values = {k: getattr(m, k) for k in ("loss", "eval_loss", "learning_rate", "grad_norm")}
        store.log_metrics("r1", m.step, **{k: v for k, v in values.items() if v is not None})
    store.add_event("r1", "Model: SmolLM2-135M-Instruct", "info")
    store.add_event("r1", "Paged optimizer falls back to non-paged on CPU", "warning")
    if with_adapter:
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (run_dir / "adapter" / "README.md").write_text("peft's template card")
        (run_dir / "adapter" / "run.json").write_text(json.dumps(make_run_json(config)))
    if with_eval:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "latest.json").write_text(json.dumps(make_eval()))
    if status == RunStatus.COMPLETED:
        store.transition("r1", status, adapter_dir=str(run_dir / "adapter"))
    else:
        store.transition("r1", status, error="Aborted by request")
    run = store.get_run("r1")
    store.close()
    return run


def linked_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_write_card_replaces_peft_template_beside_the_adapter(home):
    run = seed_run(home)
    readme = write_card(home, "r1")
    adapter = Path(run.run_dir) / "adapter"
    assert readme == adapter / "README.md"
    md = readme.read_text()
    assert "peft's template" not in md and md.startswith("---\nlibrary_name: peft")
    assert (adapter / "adapter_model.safetensors").is_file()
    images = linked_images(md)
    assert images == ["card/loss.svg", "card/learning_rate.svg", "card/grad_norm.svg"]
    for rel in images:
        ET.fromstring((adapter / rel).read_text())  # every link resolves to a valid SVG
    assert table_row(section(md, "Data"), "studio-facts")[0] == "alpaca"  # the bundled registry entry
    assert table_row(section(md, "Evaluation"), "loss ↓")[:2] == ["2.5000", "1.1000"]  # from eval/latest.json
    assert "Paged optimizer falls back" in section(md, "Notes") and "Model: Smol" not in md
    assert f"studio train {run.run_dir}/config.yaml" in md
    assert not list(adapter.rglob("*.tmp"))
    assert readme.stat().st_mode & 0o444 == 0o444  # readable by all, like the files peft writes


def test_an_adapter_without_run_json_still_gets_its_card_beside_it(home):
    run = seed_run(home)
    adapter = Path(run.run_dir) / "adapter"
    (adapter / "run.json").unlink()  # written by an older studio, or lost
    md = write_card(home, "r1").read_text()
    assert (adapter / "README.md").is_file() and "No adapter exists" not in md
    assert "final train loss 0.1000" in md.split("## Base model")[0]  # the store's last logged loss
    assert "PeftModel.from_pretrained" in md


def test_write_card_again_drops_images_it_no_longer_shows(home):
    seed_run(home)
    readme = write_card(home, "r1")
    stale = readme.parent / "card" / "old_chart.svg"
    stale.write_text("<svg/>")
    write_card(home, "r1")
    assert not stale.exists() and (readme.parent / "card" / "loss.svg").is_file()


def test_run_without_adapter_gets_its_card_in_the_run_folder(home):
    run = seed_run(home, RunStatus.ABORTED, with_adapter=False, with_eval=False)
    readme = write_card(home, "r1")
    assert readme == Path(run.run_dir) / "card" / "README.md"
    md = readme.read_text()
    assert "No adapter exists for this run" in md and "Not evaluated yet" in md
    for rel in linked_images(md):
        assert (readme.parent / rel).is_file()
    assert not (Path(run.run_dir) / "adapter" / "README.md").exists()


def test_unknown_run_and_missing_workspace_are_clear_errors(home, tmp_path):
    seed_run(home)
    with pytest.raises(CardError, match=r"No run 'nope'.*studio runs"):
        write_card(home, "nope")
    nowhere = tmp_path / "nowhere"
    with pytest.raises(CardError, match="STUDIO_HOME"):
        write_card(nowhere, "r1")
    assert not nowhere.exists()  # looking did not create a workspace


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_prints_and_fails_cleanly(home, capsys):
    run = seed_run(home)
    assert run_cli(parse(["r1"])) == 0
    assert capsys.readouterr().out.strip() == str(Path(run.run_dir) / "adapter" / "README.md")
    assert run_cli(parse([run.run_dir, "--print"])) == 0  # a run folder names its run
    out = capsys.readouterr().out
    assert out.startswith("---\nlibrary_name: peft") and "## How to reproduce" in out
    assert run_cli(parse(["nope"])) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: No run 'nope'")


# -- the card travels with the adapter export -----------------------------------------------------------


def test_adapter_export_and_zip_carry_the_card(home, tmp_path):
    from studio.reports.export import export_adapter, zip_folder

    run = seed_run(home)
    write_card(home, "r1")
    result = export_adapter(Path(run.run_dir) / "adapter", tmp_path / "out")
    names = {name for name, _ in result.files}
    assert {"README.md", "card/loss.svg", "adapter_model.safetensors", "run.json"} <= names
    assert (result.out_dir / "README.md").read_text() == (Path(run.run_dir) / "adapter" / "README.md").read_text()
    with zipfile.ZipFile(zip_folder(result.out_dir, tmp_path / "out.zip")) as zf:
        assert {"README.md", "card/loss.svg", "card/learning_rate.svg"} <= set(zf.namelist())


def test_the_card_names_the_stage():
    from studio.reports.card import stage_text

    assert stage_text({}) == "supervised fine-tuning"
    dpo = {"stage": "dpo", "preference": {"loss_type": "ipo", "beta": 0.2, "start_from": "sft-1"}}
    assert stage_text(dpo) == "DPO, ipo loss, beta 0.2, from run sft-1"
    assert stage_text({"stage": "kto", "preference": {"beta": 0.1}}) == "KTO, beta 0.1"
