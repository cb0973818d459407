"""Scale-out pieces that need no second process: the accelerate launch line (parsed by accelerate's own
parser), the distribution section's validation, rank detection, the queue's device arithmetic, and the
process plumbing (descendants, dying with the parent)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from studio.core.config import RunConfig
from studio.core.procs import child_pids
from studio.training.launch import (
    DeviceRequest,
    DistributedError,
    RankInfo,
    RankReport,
    cpu_threads_per_process,
    device_request,
    launch_command,
    launch_text,
    lora_digest,
    pick_devices,
    rank_info,
    read_rank_reports,
    request_problems,
    visible_gpus,
    write_rank_report,
)
from tests.builders import small_run_config


def config(**dist) -> RunConfig:
    cfg = small_run_config("bundled")
    for key, value in dist.items():
        setattr(cfg.distribution, key, value)
    return cfg


def parsed(argv: list[str]):
    """The launch line as accelerate itself reads it."""
    from accelerate.commands.launch import launch_command_parser

    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(argv[3:])


def test_a_two_process_cpu_run_launches_ddp_running_the_worker_module(tmp_path):
    cfg = config(processes=2)
    argv = launch_command(cfg, tmp_path / "run-1", python="/py")
    assert argv[0] == "/py"
    args = parsed(argv)
    assert args.num_processes == 2 and args.num_machines == 1 and args.machine_rank == 0
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.module and args.training_script == "studio.runs.worker"
    assert args.training_script_args == [str(tmp_path / "run-1")]
    assert args.mixed_precision == "no"  # fp32
    assert args.num_cpu_threads_per_process == 1  # the builder's train.num_threads
    assert args.main_process_port == 0  # one machine: any free port, so two runs never collide


def test_gpu_ids_and_bf16_reach_accelerate():
    cfg = config(processes=2)
    cfg.train.compute_type = "bf16"
    args = parsed(launch_command(cfg, "/runs/r", gpu_ids=[2, 3]))
    assert args.gpu_ids == "2,3" and args.mixed_precision == "bf16"
    assert args.num_cpu_threads_per_process is None  # GPU processes: accelerate's default


def test_fsdp_and_deepspeed_flags_are_accelerates_own():
    fsdp = parsed(launch_command(config(processes=4, strategy="fsdp"), "/r", gpu_ids=[0, 1, 2, 3]))
    assert fsdp.use_fsdp and fsdp.fsdp_sharding_strategy == "FULL_SHARD"
    assert fsdp.fsdp_use_orig_params == "true"  # frozen base and LoRA weights in one flat group
    assert fsdp.fsdp_state_dict_type == "FULL_STATE_DICT"  # the adapter is saved whole
    z3 = parsed(launch_command(config(processes=2, strategy="deepspeed-zero3", offload=True), "/r", gpu_ids=[0, 1]))
    assert z3.use_deepspeed and z3.zero_stage == 3
    assert z3.offload_optimizer_device == "cpu" and z3.offload_param_device == "cpu"
    assert z3.gradient_accumulation_steps == 1 and z3.zero3_save_16bit_model == "true"
    z2 = parsed(launch_command(config(processes=2, strategy="deepspeed-zero2"), "/r", gpu_ids=[0, 1]))
    assert z2.zero_stage == 2 and z2.offload_optimizer_device == "none" and z2.offload_param_device is None


def test_several_machines_name_the_main_address_and_this_machines_rank():
    cfg = config(processes=4, num_machines=2, machine_rank=1, main_address="10.0.0.5", main_port=29500)
    assert cfg.validate() == []
    args = parsed(launch_command(cfg, "/r"))
    assert args.num_machines == 2 and args.machine_rank == 1
    assert args.main_process_ip == "10.0.0.5" and args.main_process_port == 29500


def test_the_launch_text_is_what_a_person_types():
    text = launch_text(config(processes=2), "RUN_DIR")
    assert text.startswith("accelerate launch --num_processes 2 ")
    assert text.endswith("-m studio.runs.worker RUN_DIR")


def test_cpu_processes_share_the_cores():
    cfg = config(processes=2)
    cfg.train.num_threads = None
    assert cpu_threads_per_process(cfg, cores=16) == 8
    assert cpu_threads_per_process(cfg, cores=1) == 1


@pytest.mark.parametrize(
    ("dist", "train", "quant", "expected", "field"),
    [
        ({"processes": 0}, {}, "none", "distribution.processes must be a whole number", "processes"),
        ({"strategy": "horovod"}, {}, "none", "distribution.strategy must be one of", "strategy"),
        ({"processes": 2, "offload": True}, {}, "none", "offload needs a DeepSpeed strategy", "offload"),
        ({"devices": "0,0"}, {}, "none", "distribution.devices must be 'auto' or distinct CUDA ids", "devices"),
        ({"devices": "gpu0"}, {}, "none", "distribution.devices must be 'auto' or distinct CUDA ids", "devices"),
        ({"processes": 2, "devices": "0,1,2"}, {}, "none", "lists 3 GPU(s) for 2 process(es)", "devices"),
        ({"devices": "0,1"}, {}, "none", "set distribution.processes to 2", "devices"),
        ({"strategy": "fsdp"}, {}, "none", "with one process use 'ddp'", "strategy"),
        ({"processes": 4, "num_machines": 2}, {}, "none", "need distribution.main_address", "main_address"),
        (
            {"processes": 3, "num_machines": 2, "main_address": "h", "main_port": 1},
            {},
            "none",
            "split evenly",
            "processes",
        ),
        ({"num_machines": 2, "machine_rank": 2}, {}, "none", "machine_rank must be from 0 to 1", "machine_rank"),
        ({"main_port": 70000}, {}, "none", "distribution.main_port must be 0", "main_port"),
        ({"processes": 2, "strategy": "fsdp"}, {"device": "cuda"}, "4bit", "cannot be sharded with fsdp", "strategy"),
        (
            {"processes": 2, "strategy": "fsdp"},
            {"device": "cpu"},
            "none",
            "needs CUDA GPUs: on CPU use 'ddp'",
            "strategy",
        ),
        ({"processes": 2}, {"device": "mps"}, "none", "Apple MPS runs one process", "processes"),
        ({"devices": "0"}, {"device": "cpu"}, "none", "names GPUs but train.device is cpu", "devices"),
    ],
)
def test_impossible_distributions_are_refused_with_the_fix(dist, train, quant, expected, field):
    cfg = config(**dist)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cfg.quant.mode = quant
    problems = cfg.validate()
    assert any(expected in str(p) for p in problems), problems  # the words the user reads
    assert f"distribution.{field}" in {p.path for p in problems}, problems  # the field it is about


@pytest.mark.parametrize(
    "dist",
    [
        {"processes": 2},
        {"processes": 2, "strategy": "deepspeed-zero2", "offload": True},
        {"processes": 2, "devices": "3,5"},
        {"devices": "1"},
    ],
)
def test_good_distributions_pass(dist):
    cfg = config(**dist)
    cfg.train.device = "auto"
    assert cfg.validate() == []


def test_qlora_goes_with_ddp_and_zero2_only():
    for strategy, ok in (("ddp", True), ("deepspeed-zero2", True), ("deepspeed-zero3", False), ("fsdp", False)):
        cfg = config(processes=2, strategy=strategy)
        cfg.quant.mode = "4bit"
        assert (cfg.validate() == []) is ok, (strategy, cfg.validate())


def test_the_distribution_section_round_trips_through_yaml():
    cfg = config(processes=4, strategy="deepspeed-zero3", offload=True, devices="0,1,2,3")
    again = RunConfig.from_yaml(cfg.to_yaml())
    assert again.distribution == cfg.distribution
    assert RunConfig.from_yaml("distribution: {processes: 2}").distribution.processes == 2


def test_rank_info_reads_torchruns_variables():
    assert rank_info({}) == RankInfo(0, 0, 1) and not rank_info({}).distributed
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert info == RankInfo(3, 1, 4) and info.distributed and not info.main


def test_the_inventory_comes_from_studio_gpus_or_torch():
    assert visible_gpus({"STUDIO_GPUS": "0,2"}) == [0, 2]
    assert visible_gpus({"STUDIO_GPUS": "none"}) == []
    with pytest.raises(DistributedError, match="STUDIO_GPUS='a,b' is not a list of GPU ids"):
        visible_gpus({"STUDIO_GPUS": "a,b"})
    import torch

    assert visible_gpus({}) == list(range(torch.cuda.device_count() if torch.cuda.is_available() else 0))


def test_requests_follow_the_device_and_the_processes():
    assert device_request(config(processes=2), have_gpus=False) == DeviceRequest(0)  # CPU machine: a CPU slot
    cfg = config(processes=2)
    cfg.train.device = "auto"
    assert device_request(cfg, have_gpus=True) == DeviceRequest(2)
    assert device_request(config(), have_gpus=True) == DeviceRequest(1)
    cfg.train.device = "cpu"
    assert device_request(cfg, have_gpus=True) == DeviceRequest(0)
    pinned = config(processes=2, devices="3,1")
    assert device_request(pinned, have_gpus=True) == DeviceRequest(2, (3, 1))


def test_picking_gives_disjoint_free_gpus_or_waits():
    assert pick_devices(DeviceRequest(2), [3, 0, 1]) == (0, 1)
    assert pick_devices(DeviceRequest(2), [1]) is None
    assert pick_devices(DeviceRequest(1, (2,)), [0, 1]) is None  # pinned and busy: wait for it
    assert pick_devices(DeviceRequest(1, (2,)), [2]) == (2,)
    assert pick_devices(DeviceRequest(0), []) == ()


def test_requests_no_machine_can_meet_are_named():
    (pinned,) = request_problems(DeviceRequest(1, (7,)), [0, 1])
    assert pinned.path == "distribution.devices"
    assert "GPU 7, which the queue does not have (GPUs here: 0, 1)" in str(pinned)
    (too_many,) = request_problems(DeviceRequest(4), [0, 1])
    assert too_many.path == "distribution.processes" and "needs 4 GPUs and the queue has 2" in str(too_many)
    assert request_problems(DeviceRequest(2), [0, 1]) == [] and request_problems(DeviceRequest(0), []) == []


def test_rank_reports_round_trip(tmp_path):
    for rank in (1, 0):
        write_rank_report(tmp_path, RankReport(rank, 2, 100 + rank, 8, 16, 900 + rank, "ab"))
    reports = read_rank_reports(tmp_path)
    assert [r.rank for r in reports] == [0, 1] and reports[1].real_tokens == 901


def test_the_digest_tells_adapters_apart():
    import torch

    a = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    b = {k: v.clone() for k, v in a.items()}
    assert lora_digest(a) == lora_digest(b)
    b["x.lora_B.weight"][0, 0] = 1e-6
    assert lora_digest(a) != lora_digest(b)


def test_descendants_are_found(tmp_path):
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while len(child_pids(parent.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        kids = child_pids(parent.pid)
        assert len(kids) == 1 and child_pids(parent.pid, recursive=False) == kids
        assert child_pids(kids[0]) == []
    finally:
        for pid in [*child_pids(parent.pid), parent.pid]:
            os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_a_process_that_dies_with_its_parent_is_gone_when_the_parent_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, time; from studio.core.procs import die_with_parent; die_with_parent(); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    parent_code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{grandchild}") and time.monotonic() < deadline:
        with open(f"/proc/{grandchild}/stat") as f:  # reaped by init once gone; a zombie counts as gone
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                break
        time.sleep(0.1)
    state = ""
    if os.path.exists(f"/proc/{grandchild}"):
        with open(f"/proc/{grandchild}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    assert state in ("", "Z", "X"), f"the grandchild {grandchild} outlived its parent (state {state})"
