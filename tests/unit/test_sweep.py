"""Sweeps: parsing --param, expanding the grid (cheapest first, alpha scaled with r, all-or-nothing
validation), summarising scan runs, the recommended pick, and the queue and CLI around them."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from studio.cli.sweep import add_arguments
from studio.core.config import ConfigError, RunConfig
from studio.core.problems import Problem
from studio.core.store import Metric, Run, RunStatus
from studio.runs.queue import JobError, JobManager
from studio.runs.sweep import (
    SWEEPABLE,
    Pick,
    SweepError,
    SweepParam,
    SweepRow,
    expand,
    long_run_config,
    parse_param,
    recommend,
    summarize,
    sweep_notes,
)


def base_config(**train) -> RunConfig:
    cfg = RunConfig(name="demo")
    cfg.data.datasets = ["studio-facts"]
    cfg.data.val_size = 0.1
    cfg.lora.r, cfg.lora.alpha = 16, 32
    cfg.train.max_steps = 1000
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# -- parse_param ----------------------------------------------------------------------------------------
def test_parse_param_coerces_values_to_the_field_type():
    assert parse_param("lora.r=8,16,32,64") == SweepParam("lora.r", (8, 16, 32, 64))
    lr = parse_param("train.learning_rate = 1e-4, 2e-4")
    assert lr.path == "train.learning_rate" and lr.values == (1e-4, 2e-4)
    assert all(isinstance(v, float) for v in lr.values)
    assert parse_param("lora.alpha=16,32").values == (16.0, 32.0)
    assert parse_param("lora.use_rslora=false,yes").values == (False, True)
    # a value that holds commas itself: '|' separates the values instead
    assert parse_param("lora.target_modules=q,v|all-linear").values == ("q,v", "all-linear")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora.r", "is not PATH=V1,V2"),
        ("lora.rank=8,16", "'lora.rank' is not a sweepable parameter. Sweepable: lora.r, lora.alpha"),
        ("train.epochs=1,3", "train.epochs cannot be swept: scan runs stop at scan_steps"),
        ("data.val_size=0.1,0.2", "different eval split"),
        ("lora.r=8", "needs at least 2 values"),
        ("lora.r=8,16,8.0", "8 given twice"),
        ("lora.r=8,sixteen", "'sixteen' is not a whole number"),
        ("lora.r=8,12.5", "'12.5' is not a whole number"),
        ("train.learning_rate=1e-4,fast", "'fast' is not a number"),
        ("lora.r=8,,16", "an empty value"),
        ("lora.use_dora=true,maybe", "'maybe' is not true or false"),
        ("lora.target_modules=q,v,all-linear", "separate the values with '|'"),
    ],
)
def test_parse_param_refuses_bad_input_saying_what_and_how(text, expected):
    with pytest.raises(SweepError) as err:
        parse_param(text)
    assert expected in str(err.value)
    assert isinstance(err.value, ValueError)  # the UI catches ValueError; the CLI ConfigError


def test_parse_param_reports_every_bad_value():
    with pytest.raises(SweepError) as err:
        parse_param("lora.r=x,8,y")
    problems = err.value.problems
    assert [p.path for p in problems] == ["lora.r", "lora.r"]
    assert "'x'" in str(problems[0]) and "'y'" in str(problems[1])


# -- expand -----------------------------------------------------------------------------------------------
def test_expand_builds_the_grid_cheapest_first_with_alpha_scaled_with_r():
    base = base_config()
    params = [parse_param("train.learning_rate=2e-4,1e-4"), parse_param("lora.r=32,8,16,64")]
    plan = expand(base, params, scan_steps=200, name="scan")
    assert len(plan) == 8
    # rank is the outer loop, smallest first, though given second and out of order
    assert [v["lora.r"] for v, _ in plan] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert [v["train.learning_rate"] for v, _ in plan[:2]] == [1e-4, 2e-4]
    for values, cfg in plan:
        assert cfg.lora.r == values["lora.r"] and cfg.train.learning_rate == values["train.learning_rate"]
        assert cfg.lora.alpha == 2 * cfg.lora.r  # the base's alpha/r = 32/16 kept
        assert cfg.train.max_steps == 200
        assert cfg.validate() == []
    assert plan[0][1].name == "scan-r8-a16-lr0.0001"  # the name says alpha followed r
    assert plan[-1][1].name == "scan-r64-a128-lr0.0002"
    assert base.lora.r == 16 and base.lora.alpha == 32 and base.train.max_steps == 1000  # base untouched


def test_alpha_is_kept_when_swept_itself_or_under_rslora():
    base = base_config()
    plan = expand(base, [parse_param("lora.r=8,16"), parse_param("lora.alpha=8,64")], 100, "x")
    assert {(c.lora.r, c.lora.alpha) for _, c in plan} == {(8, 8), (8, 64), (16, 8), (16, 64)}
    base.lora.use_rslora = True  # rsLoRA's alpha/sqrt(r) is already stable across ranks
    plan = expand(base, [parse_param("lora.r=8,64")], 100, "x")
    assert [c.lora.alpha for _, c in plan] == [32, 32]
    assert [c.name for _, c in plan] == ["x-r8", "x-r64"]
    assert "stays 32" in " ".join(sweep_notes(base, [parse_param("lora.r=8,64")], 100))


def test_alpha_keeps_a_non_integer_ratio():
    base = base_config()
    base.lora.alpha = 24  # ratio 1.5
    plan = expand(base, [parse_param("lora.r=4,10")], 100, "x")
    assert [c.lora.alpha for _, c in plan] == [6.0, 15.0]


def test_expand_reports_every_invalid_run_and_names_them():
    with pytest.raises(SweepError) as err:
        expand(base_config(), [parse_param("lora.r=8,16,0,2000")], 100, "x")
    problems = err.value.problems
    assert [p.path for p in problems] == ["lora.r", "lora.r"]
    text = [str(p) for p in problems]
    assert any("lora.r must be a whole number of at least 1" in t and "(in lora.r=0)" in t for t in text)
    assert any("far above useful ranks" in t and "(in lora.r=2000)" in t for t in text)
    assert len(problems) == 2  # no knock-on alpha complaint for r=0


def test_a_problem_of_every_run_is_said_once():
    base = base_config()
    base.data.datasets = []
    with pytest.raises(SweepError) as err:
        expand(base, [parse_param("lora.r=8,16")], 100, "x")
    (problem,) = err.value.problems
    assert problem.path == "data.datasets"
    assert str(problem) == "data.datasets is empty: pick at least one registered dataset."


def test_an_invalid_long_run_is_refused_up_front():
    base = base_config(max_steps=0, epochs=0)
    with pytest.raises(SweepError, match=r"train\.epochs must be positive.*the long run"):
        expand(base, [parse_param("lora.r=8,16")], 100, "x")


@pytest.mark.parametrize(
    ("params", "scan_steps", "expected"),
    [
        ([], 100, "at least one parameter"),
        (["lora.r=8,16", "train.learning_rate=1e-4,2e-4", "lora.dropout=0,0.1"], 100, "At most 2 parameters"),
        (["lora.r=8,16", "lora.r=32,64"], 100, "lora.r is given twice"),
        (["lora.r=1,2,3,4,5", "train.learning_rate=1e-4,2e-4,3e-4,4e-4"], 100, "5 x 4 = 20 runs, more than 16"),
        (["lora.r=8,16"], 0, "scan_steps must be a whole number of at least 1"),
    ],
)
def test_grid_limits(params, scan_steps, expected):
    with pytest.raises(SweepError, match=expected):
        expand(base_config(), [parse_param(p) for p in params], scan_steps, "x")


def test_scan_runs_get_a_few_eval_points_but_never_fewer_than_asked():
    plan = expand(base_config(eval_steps=50, logging_steps=5), [parse_param("lora.r=8,16")], 40, "x")
    assert plan[0][1].train.eval_steps == 10 and plan[0][1].train.logging_steps == 4
    plan = expand(base_config(eval_steps=5, logging_steps=1), [parse_param("lora.r=8,16")], 400, "x")
    assert plan[0][1].train.eval_steps == 5 and plan[0][1].train.logging_steps == 1


def test_notes_warn_about_missing_validation_and_a_scan_as_long_as_the_run():
    base = base_config(max_steps=100)
    base.data.val_size = 0.0
    notes = " ".join(sweep_notes(base, [parse_param("lora.r=8,16")], 100))
    assert "data.val_size is 0" in notes and "not fewer than the long run" in notes
    assert "alpha/r = 32/16 = 2" in notes


def test_long_run_config_keeps_the_base_length_and_takes_the_pick():
    base = base_config(max_steps=0, epochs=3.0)
    cfg = long_run_config(base, {"lora.r": 8, "train.learning_rate": 5e-4}, "demo-long")
    assert cfg.name == "demo-long" and cfg.train.max_steps == 0 and cfg.train.epochs == 3.0
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.train.learning_rate == 5e-4
    assert cfg.train.eval_steps == base.train.eval_steps


def test_every_sweepable_path_is_a_real_config_field():
    cfg = RunConfig()
    for path in SWEEPABLE:
        section, name = path.split(".")
        assert hasattr(getattr(cfg, section), name), path


# -- summarize and recommend -----------------------------------------------------------------------------
def make_run(run_id: str, r: int, status: RunStatus = RunStatus.COMPLETED, **fields) -> Run:
    now = time.time()
    config = {"lora": {"r": r, "alpha": 2 * r}, "train": {"learning_rate": 2e-4}}
    started = fields.pop("started_at", now - 30 if status != RunStatus.QUEUED else None)
    finished = now if status.finished else None
    return Run(run_id, f"s-r{r}", status, config, "m", "d", f"/runs/{run_id}", now - 60, started, finished, **fields)


def row(run_id: str, r: int, eval_loss: float | None, train_loss: float = 1.0, status: str = "completed", params=None):
    return SweepRow(run_id, run_id, {"lora.r": r}, status, train_loss, eval_loss, params or r * 1000, 10.0, 500.0)


def test_summarize_takes_final_losses_and_run_json_figures():
    runs = [make_run("a", 8), make_run("b", 16, RunStatus.RUNNING), make_run("c", 32, RunStatus.QUEUED)]
    metrics = {
        "a": [Metric(1, 0, loss=2.0, memory_mb=300), Metric(5, 0, loss=1.5, eval_loss=1.7), Metric(10, 0, loss=1.2)],
        "b": [Metric(1, 0, loss=2.1, memory_mb=350), Metric(2, 0, loss=2.0, memory_mb=420)],
    }
    run_json = {"a": {"trainable_parameters": 1234, "peak_memory_mb": 512.5, "train_runtime_s": 20.0}, "b": None}
    rows = summarize(runs, metrics, run_json, paths=["lora.r"])
    a, b, c = rows
    assert (a.run_id, a.values, a.status) == ("a", {"lora.r": 8}, "completed")
    assert a.final_train_loss == 1.2 and a.final_eval_loss == 1.7  # the last logged of each
    assert a.trainable_params == 1234 and a.peak_memory_mb == 512.5
    assert a.seconds == pytest.approx(30, abs=1)  # wall time of the run, start to finish
    assert b.final_eval_loss is None and b.trainable_params is None and b.peak_memory_mb == 420  # while running
    assert (c.status, c.seconds, c.final_train_loss, c.peak_memory_mb) == ("queued", None, None, None)


def test_recommend_takes_the_best_eval_loss_with_the_figures():
    pick = recommend([row("a", 8, 1.50), row("b", 16, 1.20), row("c", 32, 1.30)])
    assert isinstance(pick, Pick) and pick.run_id == "b" and pick.values == {"lora.r": 16}
    assert pick.metric == "eval_loss" and pick.loss == 1.20
    assert "lora.r=16 has the lowest final eval loss: 1.2000" in pick.reason
    assert "1.3000" in pick.reason and "lora.r=32" in pick.reason  # against the runner-up


def test_a_tie_within_one_percent_goes_to_the_smaller_rank():
    pick = recommend([row("a", 8, 1.006), row("b", 16, 1.000), row("c", 32, 0.999)])
    assert pick.run_id == "a"  # 0.7% worse than the best, at a quarter of its size
    assert "lora.r=32 has the lowest final eval loss (0.9990)" in pick.reason
    assert "lora.r=8 is within 1% of it (1.0060)" in pick.reason
    assert "fewer trainable parameters (8,000 vs 32,000)" in pick.reason
    assert recommend([row("a", 8, 1.02), row("b", 16, 1.00)]).run_id == "b"  # 2% is not a tie


def test_without_eval_loss_the_pick_falls_back_to_train_loss_and_says_why():
    pick = recommend([row("a", 8, None, train_loss=1.4), row("b", 16, None, train_loss=1.1)])
    assert pick.run_id == "b" and pick.metric == "loss"
    assert "final train loss" in pick.reason
    assert "favours bigger ranks" in pick.reason and "data.val_size" in pick.reason


def test_nothing_completed_means_no_pick_and_unfinished_runs_are_mentioned():
    assert recommend([]) is None
    assert recommend([row("a", 8, None, status="queued"), row("b", 16, 1.0, status="failed")]) is None
    pick = recommend([row("a", 8, 1.0), row("b", 16, None, status="running"), row("c", 32, None, status="failed")])
    assert pick.run_id == "a" and "only run with a final eval loss" in pick.reason
    assert "1 of 3 runs have not finished yet" in pick.reason and "lora.r=32 (failed)" in pick.reason


# -- the queue --------------------------------------------------------------------------------------------
@pytest.fixture
def jobs(home):
    return JobManager(home, slots=0)  # queue only: no worker starts in a unit test


def test_submit_sweep_queues_every_run_in_scan_order(jobs):
    sweep, runs = jobs.submit_sweep(base_config(), [parse_param("lora.r=32,8,16")], 50, "scan")
    assert [r.config["lora"]["r"] for r in runs] == [8, 16, 32]
    assert [r.id for r in jobs.store.queued_runs()] == [r.id for r in runs]  # the queue trains them in order
    assert all(r.sweep_id == sweep.id and r.status == RunStatus.QUEUED for r in runs)
    assert all(r.config["train"]["max_steps"] == 50 for r in runs)
    assert RunConfig.load(jobs.run_dir(runs[0].id) / "config.yaml").lora.alpha == 16
    assert sweep.params == [{"path": "lora.r", "values": [32, 8, 16]}] and sweep.scan_steps == 50
    assert sweep.base_config["train"]["max_steps"] == 1000 and sweep.long_run_id is None
    assert [r.id for r in jobs.store.runs_of_sweep(sweep.id)] == [r.id for r in runs]
    assert "Scan run 1/3 of sweep" in jobs.store.events(runs[0].id)[0].message
    assert [s.id for s in jobs.store.list_sweeps()] == [sweep.id]


def test_an_invalid_third_value_queues_nothing(jobs, home):
    with pytest.raises(SweepError, match=r"lora\.dropout must be in \[0, 1\).*\(in lora\.dropout=1\.5\)"):
        jobs.submit_sweep(base_config(), [parse_param("lora.dropout=0.0,0.1,1.5")], 50, "scan")
    assert jobs.store.list_runs() == [] and jobs.store.list_sweeps() == []
    assert list((home / "runs").iterdir()) == []


def test_unknown_datasets_and_layers_are_refused_before_anything_is_queued(jobs, home):
    base = base_config()
    base.data.datasets = ["nope"]
    params = [parse_param("lora.target_modules=q_proj|no_such_proj")]
    with pytest.raises(SweepError) as err:
        jobs.submit_sweep(base, params, 50, "scan")
    assert [p.path for p in err.value.problems] == ["data.datasets", "lora.target_modules"]
    text = str(err.value)
    assert "Dataset 'nope' is not registered" in text and "no_such_proj not found in this model" in text
    assert jobs.store.list_runs() == [] and list((home / "runs").iterdir()) == []


def complete(jobs: JobManager, run_id: str, eval_loss: float, trainable: int) -> None:
    """What a worker leaves behind: metrics, run.json, the completed row."""
    jobs.store.transition(run_id, RunStatus.RUNNING)
    jobs.store.log_metrics(run_id, 5, loss=eval_loss - 0.1)
    jobs.store.log_metrics(run_id, 5, eval_loss=eval_loss)
    adapter = jobs.run_dir(run_id) / "adapter"
    adapter.mkdir()
    (adapter / "run.json").write_text(json.dumps({"trainable_parameters": trainable, "peak_memory_mb": 400.0}))
    jobs.store.transition(run_id, RunStatus.COMPLETED, adapter_dir=str(adapter))


def test_promote_refuses_until_a_run_completed_then_starts_the_long_run_once(jobs):
    sweep, runs = jobs.submit_sweep(base_config(), [parse_param("lora.r=8,16")], 50, "scan")
    with pytest.raises(JobError, match=r"No scan run of sweep .* has completed yet \(2 queued\)"):
        jobs.promote_sweep(sweep.id)
    complete(jobs, runs[0].id, 1.30, 1000)
    complete(jobs, runs[1].id, 1.10, 2000)
    _, rows, pick = jobs.sweep_summary(sweep.id)
    assert [r.trainable_params for r in rows] == [1000, 2000] and pick.run_id == runs[1].id

    long = jobs.promote_sweep(sweep.id)
    cfg = RunConfig.from_dict(long.config)
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.train.max_steps == 1000  # the base's length
    assert long.sweep_id == sweep.id and jobs.store.get_sweep(sweep.id).long_run_id == long.id
    assert [r.id for r in jobs.store.runs_of_sweep(sweep.id)][-1] == long.id
    assert [r.run_id for r in jobs.sweep_summary(sweep.id)[1]] == [r.id for r in runs]  # not a scan row
    with pytest.raises(JobError, match=f"already has its long run: {long.id}"):
        jobs.promote_sweep(sweep.id)

    jobs.abort(long.id)
    jobs.delete(long.id)  # deleting the long run allows another; the sweep stays
    assert jobs.store.get_sweep(sweep.id).long_run_id is None
    assert jobs.promote_sweep(sweep.id).id != long.id


def test_deleted_scan_runs_leave_the_sweep_readable(jobs):
    sweep, runs = jobs.submit_sweep(base_config(), [parse_param("lora.r=8,16")], 50, "scan")
    for run in runs:
        jobs.abort(run.id)
        jobs.delete(run.id)
    got, rows, pick = jobs.sweep_summary(sweep.id)
    assert got.id == sweep.id and rows == [] and pick is None
    with pytest.raises(JobError, match="no scan runs left"):
        jobs.promote_sweep(sweep.id)


def test_all_failed_scan_runs_say_how_to_find_out_why(jobs):
    sweep, runs = jobs.submit_sweep(base_config(), [parse_param("lora.r=8,16")], 50, "scan")
    for run in runs:
        jobs.store.transition(run.id, RunStatus.FAILED, error="boom")
    with pytest.raises(JobError, match=r"completed \(2 failed\): see why with `studio run RUN --log 40`"):
        jobs.promote_sweep(sweep.id)


def test_unknown_sweep_is_a_key_error_with_a_hint(jobs):
    with pytest.raises(KeyError) as err:
        jobs.sweep_summary("nope")
    assert "No sweep 'nope'" in str(err.value)


# -- the CLI ----------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studio")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("sweep"))
    args = parser.parse_args(["sweep", *argv])
    return args.func(args)


def test_cli_start_show_promote(home, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_SLOTS", "0")
    args = ["quick-demo", "--param", "lora.r=16,4", "--scan-steps", "20", "--set", "data.val_size=0.2"]
    code = cli(["start", *args, "--name", "ranks", "--detach"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 scan runs of 20 steps each" in out and "lora.alpha follows lora.r" in out
    assert "lora.r=4  (lora.alpha=8)" in out and "studio sweep promote" in out and "max_steps 40" in out
    sweep_id = out.split()[1].rstrip(":")

    assert cli(["show", sweep_id, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [r["values"] for r in body["runs"]] == [{"lora.r": 4}, {"lora.r": 16}] and body["pick"] is None
    assert cli(["show", sweep_id]) == 0
    assert "pick: none yet" in capsys.readouterr().out

    assert cli(["promote", sweep_id, "--detach"]) == 1  # the operation ran and was refused
    assert "has completed yet" in capsys.readouterr().err

    assert cli(["list"]) == 0
    assert sweep_id in capsys.readouterr().out


def test_cli_bad_input_exits_2_with_one_line_and_queues_nothing(home, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_SLOTS", "0")
    code = cli(["start", "quick-demo", "--param", "lora.r=8,x", "--param", "train.epochs=1,2", "--detach"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")
    assert "'x' is not a whole number" in err and "train.epochs cannot be swept" in err
    assert cli(["start", "quick-demo", "--param", "lora.r=8,0", "--detach"]) == 2
    assert "lora.r must be a whole number of at least 1" in capsys.readouterr().err
    assert list((home / "runs").iterdir()) == []
    assert cli(["show", "nope"]) == 2
    assert "No sweep 'nope'" in capsys.readouterr().err


def test_sweep_error_is_a_config_error_for_existing_handlers():
    err = SweepError(["a", "b"])
    assert isinstance(err, ConfigError) and str(err).startswith("Invalid sweep:")
    assert err.problems == [Problem("", "a"), Problem("", "b")]  # bare sentences: problems about no one field


def test_cli_follows_each_scan_run_then_prints_the_table_and_pick(home, capsys, monkeypatch):
    """Without --detach the CLI tails the scan runs in turn (here a stand-in for `follow` finishes them
    as a worker would: one fails, which does not stop the scan), then shows the table and the pick."""
    import studio.cli.common

    monkeypatch.setenv("STUDIO_SLOTS", "0")
    followed = []

    def fake_follow(jobs, run_id):
        followed.append(run_id)
        if len(followed) == 2:  # r=8 runs out of memory
            jobs.store.transition(run_id, RunStatus.RUNNING)
            jobs.store.transition(run_id, RunStatus.FAILED, error="Out of memory")
            return 1
        complete(jobs, run_id, 1.5 - 0.1 * len(followed), 1000 * len(followed))
        return 0

    monkeypatch.setattr(studio.cli.common, "follow", fake_follow)
    code = cli(["start", "quick-demo", "--param", "lora.r=4,8,16", "--set", "data.val_size=0.2", "--scan-steps", "9"])
    out = capsys.readouterr().out
    assert code == 0 and len(followed) == 3
    table = out[out.index("steps per scan run") :]
    assert "lora.r=8  failed" in table and "1.2000" in table and "3,000" in table
    assert "* lora.r=16" in table and "pick: lora.r=16" in table and "Not compared: lora.r=8 (failed)" in table
    assert "next: studio sweep promote" in table and "max_steps 40" in table


def test_cli_stops_following_when_a_scan_run_is_aborted(home, capsys, monkeypatch):
    import studio.cli.common

    monkeypatch.setenv("STUDIO_SLOTS", "0")

    def fake_follow(jobs, run_id):  # Ctrl-C: the run saves and aborts
        jobs.abort(run_id)
        return 1

    monkeypatch.setattr(studio.cli.common, "follow", fake_follow)
    assert cli(["start", "quick-demo", "--param", "lora.r=4,8", "--scan-steps", "9"]) == 1
    out = capsys.readouterr().out
    assert "Stopped following" in out and "other runs stay queued" in out
    assert [r.status for r in JobManager(home).store.list_runs()].count(RunStatus.QUEUED) == 1
