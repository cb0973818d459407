"""A run card on a really trained run: a tiny random Llama trains a few steps through the real worker, then
the card goes beside the adapter, its images exist, and plain PEFT still loads the folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from studio.core.store import RunStatus
from studio.reports.card import write_card
from studio.runs.queue import JobManager
from tests.builders import small_run_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("card-home")
    cfg = small_run_config(
        tiny_model_dir,
        "card-tiny",
        data={"cutoff_len": 48, "val_size": 0.2},
        # random tiny model: a large step makes B clearly non-zero
        train={"eval_steps": 2, "learning_rate": 1e-2},
    )
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(home)  # the worker reads its workspace from the environment
    jobs = JobManager(home)
    try:
        run = jobs.wait(jobs.submit(cfg).id, timeout=600)
    finally:
        for r in jobs.store.list_runs(RunStatus.RUNNING):  # never leave a worker behind
            if r.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGKILL)
        if old is None:
            os.environ.pop("STUDIO_HOME", None)
        else:
            os.environ["STUDIO_HOME"] = old
    assert run.status == RunStatus.COMPLETED, (run.error, [e.message for e in jobs.store.events(run.id)])
    return {"home": home, "run": run, "readme": write_card(home, run.id)}


def test_card_sits_beside_the_adapter_with_its_images(trained):
    adapter = Path(trained["run"].adapter_dir)
    readme = trained["readme"]
    assert readme == adapter / "README.md"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    md = readme.read_text()
    assert md.startswith("---\nlibrary_name: peft") and "base_model" not in md.split("---")[1]  # a local base
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "card/loss.svg" in images and "card/learning_rate.svg" in images
    for rel in images:
        root = ET.fromstring((adapter / rel).read_text())
        assert root.tag.endswith("svg")
    loss = ET.fromstring((adapter / "card" / "loss.svg").read_text())
    lines = [p.get("points").split() for p in loss.iter("{http://www.w3.org/2000/svg}polyline")]
    assert [len(points) for points in lines] == [4, 2]  # train loss at 4 steps, eval loss at steps 2 and 4


def test_card_reports_the_real_run(trained):
    run, md = trained["run"], trained["readme"].read_text()
    body = json.loads((Path(run.adapter_dir) / "run.json").read_text())
    assert f"| trainable parameters | {body['trainable_parameters']:,} |" in md
    assert f"| final train loss | {run.final_loss:,.4f} |" in md
    assert "| steps | 4 of 4 |" in md
    assert f"studio train {run.run_dir}/config.yaml" in md
    assert (Path(run.run_dir) / "config.yaml").is_file()
    assert "Not evaluated yet" in md  # no eval/latest.json for this run


def test_peft_still_loads_the_folder_and_the_adapter_acts(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    adapter = Path(trained["run"].adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the trained weights were loaded, not a blank adapter


def test_exported_adapter_keeps_the_card(trained, tmp_path):
    from studio.reports.export import export_adapter

    result = export_adapter(Path(trained["run"].adapter_dir), tmp_path / "out")
    names = {name for name, _ in result.files}
    assert {"README.md", "card/loss.svg", "adapter_model.safetensors"} <= names
