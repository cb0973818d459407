"""The Export tab shows each event of the export's report: progress, then the files or the error."""

from __future__ import annotations

from studio.services.exporter import ExportEvent
from studio.ui.common import UIContext
from studio.ui.export import export_view, run_export


def test_progress_and_errors_show_as_messages():
    assert export_view(ExportEvent("progress", "Writing the zip"), "merged") == ("⏳ Writing the zip…", None, None)
    assert export_view(ExportEvent("error", "no adapter", {"code": 1}), "merged") == (
        "**Export failed:** no adapter",
        None,
        None,
    )


def test_a_result_lists_the_files_and_offers_the_zip(tmp_path):
    out = tmp_path / "run1-adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (tmp_path / "run1-adapter.zip").write_bytes(b"PK")
    event = ExportEvent("result", "Saved", {"out_dir": str(out), "zip": str(tmp_path / "run1-adapter.zip")})
    message, files, zip_path = export_view(event, "adapter")
    assert message.startswith("**Adapter (PEFT format)** saved to") and list(files["file"]) == ["adapter_config.json"]
    assert zip_path == str(tmp_path / "run1-adapter.zip")
    no_zip = ExportEvent("result", "Saved", {"out_dir": str(out), "zip": None})
    assert export_view(no_zip, "merged")[0].startswith("**Merged model") and export_view(no_zip, "merged")[2] is None


def test_bad_requests_are_answered_without_a_child(home):
    ctx = UIContext(home)
    assert list(run_export(ctx, None, "merged", "", "fp32", False)) == [("Pick a completed run to export.", None, None)]
    ((message, _, _),) = run_export(ctx, "run1", "merged", "../up", "fp32", False)
    assert message.startswith("**Error:** Folder name '../up' is not allowed")
