"""The demo's output folder: refused when busy or holding an earlier run, replaced only by a finished run, and
left untouched (no empty or half-written folder) by a run that fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peft_perft.cli import main
from peft_perft.cli.inputs import InputError
from peft_perft.demo import run as demo_run
from peft_perft.demo.output import claim_output_dir, require_usable_output_dir


def leftovers(output_dir: Path) -> list[str]:
    """The lock and staging files a run keeps beside its output folder while it works."""
    return sorted(path.name for path in output_dir.parent.iterdir() if path.name.startswith(f".{output_dir.name}."))


def test_a_folder_holding_an_earlier_run_is_refused_in_one_line_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "report.json").write_text("{}")
    monkeypatch.setattr(demo_run, "_run_pipeline", lambda *args: pytest.fail("the demo ran before refusing"))
    assert main(["demo", "--output-dir", str(output_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"peft-perft demo: error: --output-dir {output_dir} already holds files (an earlier run?); pass --overwrite "
        f"to replace them once this run has finished, or choose another --output-dir."
    )
    assert (output_dir / "report.json").read_text() == "{}"


def test_a_folder_another_live_run_is_writing_to_is_refused(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(str(os.getppid()))  # a live process other than this one
    with pytest.raises(InputError, match=f"being written by another run \\(process {os.getppid()}\\)"):
        require_usable_output_dir(output_dir, overwrite=True)
    with pytest.raises(InputError, match="being written by another run"), claim_output_dir(output_dir, True):
        pytest.fail("a second run got the folder")
    assert not output_dir.exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999999")  # no such process
    with claim_output_dir(output_dir, overwrite=False) as work:
        (work / "report.json").write_text("new")
    assert (output_dir / "report.json").read_text() == "new" and leftovers(output_dir) == []


def test_overwrite_replaces_the_earlier_run_only_once_the_new_one_has_finished(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("old")
    with claim_output_dir(output_dir, overwrite=True) as work:
        (work / "report.json").write_text("new")
        assert (output_dir / "old.txt").read_text() == "old", "the earlier run must stay until this one finishes"
    assert sorted(path.name for path in output_dir.iterdir()) == ["report.json"]
    assert leftovers(output_dir) == []


def test_a_run_that_fails_after_the_checks_leaves_no_folder_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = tmp_path / "nested" / "out"

    def fail_midway(args, device, work: Path) -> dict:
        (work / "half-written.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(demo_run, "_run_pipeline", fail_midway)
    assert main(["demo", "--output-dir", str(output_dir)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not output_dir.exists() and leftovers(output_dir) == []
