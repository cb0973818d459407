"""Export: merge an adapter into its full-precision base and save an ordinary HF folder, or copy the adapter.

Merging always loads the base in full precision, also for QLoRA runs: folding B*A into 4-bit weights
would re-quantize them and lose what was learned.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from studio.core.errors import ExitCode, StudioError
from studio.core.workspace import RunDir
from studio.model.loading import load_model, load_tokenizer, resolve_model


class ExportError(StudioError, RuntimeError):
    """An export that cannot be made or did not finish; the message says why."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: list[tuple[str, int]]  # name, bytes

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [f"{name}  {size / 2**20:.2f} MiB" for name, size in self.files]
        return f"Saved to {self.out_dir} ({self.total_bytes / 2**20:.1f} MiB):\n" + "\n".join(lines)


def find_adapter(run_or_path: str, home: Path) -> Path:
    """An adapter folder given as a path, or as a run id whose training completed."""
    path = Path(run_or_path).expanduser()
    if path.is_dir():
        if RunDir.is_adapter(path):
            return path.resolve()
        if RunDir(path).has_adapter():
            return RunDir(path).adapter.resolve()
        raise ExportError(f"'{run_or_path}' holds no adapter (adapter_config.json + adapter_model.safetensors).")
    from studio.core.store import RunNotFound, Store
    from studio.core.workspace import db_path

    store = Store(db_path(home))
    try:
        run = store.get_run(run_or_path)
    except RunNotFound as err:
        raise ExportError(str(err)) from err
    adapter = RunDir.of(run).adapter
    if not RunDir.is_adapter(adapter):
        raise ExportError(f"Run {run.id} is {run.status.value} and has no final adapter; export a completed run.")
    return adapter


def adapter_base_source(adapter_dir: Path) -> tuple[str, bool]:
    """The base model a studio adapter was trained on (run.json), else peft's base_model_name_or_path."""
    run_json = adapter_dir / RunDir.RUN_JSON
    if run_json.is_file():
        body = json.loads(run_json.read_text())
        return body["base_model"]["source"], bool(body["config"]["model"].get("trust_remote_code", False))
    config = json.loads((adapter_dir / RunDir.ADAPTER_CONFIG).read_text())
    return config.get("base_model_name_or_path") or "bundled", False


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty. Choose a new folder or pass overwrite.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir


def _finish(tmp: Path, out_dir: Path) -> ExportResult:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    files = sorted((p.relative_to(out_dir).as_posix(), p.stat().st_size) for p in out_dir.rglob("*") if p.is_file())
    return ExportResult(out_dir, files)


def merge_adapter(adapter_dir: Path, out_dir: Path, dtype: str = "fp32", overwrite: bool = False) -> ExportResult:
    """Base (full precision) + adapter -> merged weights, saved with the tokenizer as a plain HF folder."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    out_dir = _prepare_out(out_dir, overwrite)
    source, trust = adapter_base_source(adapter_dir)
    resolved = resolve_model(source)
    base = load_model(resolved, dtype=dtype, trust_remote_code=trust)
    model = PeftModel.from_pretrained(base, adapter_dir)
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(resolved, trust)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (adapter_dir / RunDir.RUN_JSON).is_file():
            shutil.copy2(adapter_dir / RunDir.RUN_JSON, tmp / "studio_run.json")
        return _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_adapter(adapter_dir: Path, out_dir: Path, overwrite: bool = False) -> ExportResult:
    """The adapter alone (PEFT format, tokenizer and run.json beside it), with its run card (README.md and
    the card's images) when one was written."""
    adapter_dir = Path(adapter_dir)
    out_dir = _prepare_out(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        for item in adapter_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if (adapter_dir / RunDir.CARD_IMAGES).is_dir():
            shutil.copytree(adapter_dir / RunDir.CARD_IMAGES, tmp / RunDir.CARD_IMAGES)
        return _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def zip_folder(folder: Path, zip_path: Path) -> Path:
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for item in sorted(folder.rglob("*")):
            if item.is_file():
                zf.write(item, item.relative_to(folder))
    return zip_path
