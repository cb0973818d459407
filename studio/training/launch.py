"""Scale out through an existing engine: the `accelerate launch` line for a run, the rank a process is, and
the devices the queue hands out. No distributed trainer of our own: accelerate starts the processes
(torchrun underneath), transformers' Trainer shards the data and averages the gradients.

Pure functions over the config and the environment, so the queue, the worker and the Train tab's command
box build the same line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studio.core.config import RunConfig, parse_gpu_ids
from studio.core.errors import ExitCode, StudioError
from studio.core.fsutil import atomic_write_json
from studio.core.problems import Problem
from studio.core.workspace import RunDir

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
GPUS_ENV = "STUDIO_GPUS"  # the GPU inventory the queue may hand out ("0,1", or "none"); default: all visible
ASSIGNED_ENV = "STUDIO_ASSIGNED_GPUS"  # set by the queue on a worker: the physical ids it was given


class DistributedError(StudioError, RuntimeError):
    """A launch that cannot be made; the message says why and what to change."""

    exit_code = ExitCode.FAILED


# -- the launch line ------------------------------------------------------------------------------
def strategy_flags(config: RunConfig) -> list[str]:
    """accelerate's flags for the strategy. FSDP's wrapping policy for LoRA is peft's: the Trainer swaps it
    in for a PeftModel (transformers' update_fsdp_plugin_peft); orig params keep frozen and trainable
    weights in one flat group."""
    d, t = config.distribution, config.train
    if d.strategy == "ddp":
        return ["--multi_gpu"]
    if d.strategy == "fsdp":
        return [
            "--use_fsdp",
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_use_orig_params",
            "true",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            "--fsdp_cpu_ram_efficient_loading",
            "true",
            "--fsdp_sync_module_states",
            "true",
        ]
    stage = d.strategy.rsplit("zero", 1)[1]
    offload = "cpu" if d.offload else "none"
    flags = [
        "--use_deepspeed",
        "--zero_stage",
        stage,
        "--offload_optimizer_device",
        offload,
        "--gradient_accumulation_steps",
        str(t.grad_accum),
        "--gradient_clipping",
        str(t.max_grad_norm if t.max_grad_norm > 0 else 1.0),
    ]
    if stage == "3":
        flags += ["--offload_param_device", offload, "--zero3_init_flag", "false", "--zero3_save_16bit_model", "true"]
    return flags


def cpu_threads_per_process(config: RunConfig, cores: int | None = None) -> int:
    """CPU processes share the cores: each gets its part, so two processes on two cores do not fight."""
    if config.train.num_threads:
        return config.train.num_threads
    return max(1, (cores or os.cpu_count() or 1) // config.distribution.per_machine)


def launch_command(
    config: RunConfig, run_dir: Path | str, gpu_ids: list[int] | None = None, python: str | None = None
) -> list[str]:
    """The argv (no shell) that starts every process of this machine for the run: `accelerate launch`
    with the strategy's flags, running `studio.runs.worker RUN_DIR` in each. gpu_ids: physical CUDA ids the
    queue gave the run (None on CPU, or to leave the choice to CUDA_VISIBLE_DEVICES)."""
    d = config.distribution
    cmd = [
        python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(d.processes),
        "--num_machines",
        str(d.num_machines),
        "--machine_rank",
        str(d.machine_rank),
        "--main_process_port",
        str(d.main_port),
        "--mixed_precision",
        MIXED_PRECISION[config.train.compute_type],
        "--dynamo_backend",
        "no",
    ]
    if d.num_machines > 1:
        cmd += ["--main_process_ip", d.main_address, "--same_network"]
    if gpu_ids:
        cmd += ["--gpu_ids", ",".join(str(i) for i in gpu_ids)]
    else:
        cmd += ["--num_cpu_threads_per_process", str(cpu_threads_per_process(config))]
    cmd += strategy_flags(config)
    return [*cmd, "-m", "studio.runs.worker", str(run_dir)]


def typed_line(argv: list[str]) -> str:
    """A launch_command argv as a person types it: `accelerate launch ...`."""
    return "accelerate launch " + shlex.join(argv[3:])


def launch_text(config: RunConfig, run_dir: str = "RUN_DIR", gpu_ids: list[int] | None = None) -> str:
    """The launch line of a config, for the command box: the GPUs it pins unless others are given."""
    return typed_line(
        launch_command(config, run_dir, gpu_ids if gpu_ids is not None else config.distribution.device_ids())
    )


# -- which process am I ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info(env: dict[str, str] | None = None) -> RankInfo:
    """This process's place in a launched run, from the variables torchrun sets (none: a lone process)."""
    env = os.environ if env is None else env
    return RankInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def reduce_over_ranks(values: list[int], op: str, device: Any) -> list[int]:
    """Whole numbers combined over every process ('sum' or 'max'), the same answer on each; as they are
    outside a launched run. A collective: every process must call it at the same point. device: where
    the backend reduces (NCCL only reduces GPU tensors)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return [int(v) for v in tensor.tolist()]


def any_rank(flag: bool, device: Any) -> bool:
    """True on every process when it is true on any: a stop request (SIGTERM reaches the processes at
    slightly different moments) must end every process at the same step, or the others wait forever in the
    next gradient all-reduce."""
    return bool(reduce_over_ranks([int(flag)], "max", device)[0])


# -- what each process did ------------------------------------------------------------------------
def lora_digest(state: dict[str, Any]) -> str:
    """sha256 over the adapter's tensors (names sorted, float32 bytes): equal digests, equal adapters."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RankReport:
    rank: int
    world_size: int
    pid: int
    global_step: int
    samples: int  # training samples (or packed blocks) this process fed its model
    real_tokens: int
    lora_sha256: str  # the trainable weights this process held at its end


def write_rank_report(run_dir: Path, report: RankReport) -> Path:
    """RUN_DIR/ranks/rank-N.json: what this process did, written at its end."""
    return atomic_write_json(RunDir(run_dir).rank_report(report.rank), asdict(report))


def read_rank_reports(run_dir: Path) -> list[RankReport]:
    out = []
    for path in RunDir(run_dir).rank_reports():
        try:
            out.append(RankReport(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.rank)


# -- devices for the queue ------------------------------------------------------------------------
def visible_gpus(env: dict[str, str] | None = None) -> list[int]:
    """Physical CUDA ids the queue may hand out: STUDIO_GPUS when set (to keep GPUs for other work, or to
    declare them), else every GPU torch sees, named as CUDA_VISIBLE_DEVICES names them."""
    env = os.environ if env is None else env
    if GPUS_ENV in env:
        try:
            return parse_gpu_ids(env[GPUS_ENV])
        except ValueError as err:
            raise DistributedError(f"{GPUS_ENV}={env[GPUS_ENV]!r} is not a list of GPU ids like '0,1'.") from err
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPUs to hand out, not a dead queue
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        try:
            return parse_gpu_ids(visible)[:count]
        except ValueError:  # UUIDs: torch's own numbering is all we can pass on
            return list(range(count))
    return list(range(count))


@dataclass(frozen=True)
class DeviceRequest:
    gpus: int  # 0: a CPU run, which takes a CPU slot instead
    pinned: tuple[int, ...] = ()


def device_request(config: RunConfig, have_gpus: bool) -> DeviceRequest:
    """What a run needs from the queue: CPU runs need a slot, GPU runs one GPU per local process."""
    d = config.distribution
    if config.train.device in ("cpu", "mps") or not have_gpus:
        return DeviceRequest(0)
    try:
        pinned = d.device_ids()
    except ValueError:
        pinned = None
    if pinned:
        return DeviceRequest(len(pinned), tuple(pinned))
    return DeviceRequest(d.per_machine if d.launched else 1)


def request_problems(request: DeviceRequest, gpus: list[int]) -> list[Problem]:
    """Why a request can never be met on this machine (it would wait in the queue forever)."""
    if request.gpus == 0:
        return []
    missing = [i for i in request.pinned if i not in gpus]
    if missing:
        return [
            Problem(
                "distribution.devices",
                f"distribution.devices names GPU {', '.join(map(str, missing))}, which the queue does not have "
                f"(GPUs here: {', '.join(map(str, gpus)) or 'none'}). Pick from those, or use 'auto'.",
            )
        ]
    if request.gpus > len(gpus):
        return [
            Problem(
                "distribution.processes",
                f"The run needs {request.gpus} GPUs and the queue has {len(gpus)}",
                f"lower distribution.processes to {len(gpus) or 1}{'' if gpus else ' and train on CPU'}.",
            )
        ]
    return []


def pick_devices(request: DeviceRequest, free: list[int]) -> tuple[int, ...] | None:
    """The GPUs to give a run now, or None when too few are free (it waits). Lowest ids first."""
    if request.gpus == 0:
        return ()
    if request.pinned:
        return request.pinned if all(i in free for i in request.pinned) else None
    free = sorted(free)
    return tuple(free[: request.gpus]) if len(free) >= request.gpus else None
