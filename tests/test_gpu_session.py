"""scripts/gpu_session.sh is a prepared script for a GPU machine: it must parse, and its table
(benchmarks/gpu_report.py) must read what the session leaves behind: JUnit reports, the MegaBlocks status and the
benchmark's JSON, with the roofline prediction for the benchmark's own model beside each target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_prediction  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import gpu_report  # noqa: E402
import olmoe_step  # noqa: E402

ROOT = Path(__file__).parents[1]
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="1" tests="3"><testcase classname="tests.test_compile" name="test_a"/><testcase classname="tests.test_compile"
name="test_b"/><testcase classname="tests.test_compile" name="test_cuda"><skipped type="pytest.skip"
message="needs a CUDA device">skip</skipped></testcase></testsuite></testsuites>"""


def test_gpu_session_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_session.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_report_reads_tests_megablocks_and_benchmark_with_the_roofline_beside_it(tmp_path: Path) -> None:
    (tmp_path / "tests_compile.xml").write_text(JUNIT)
    (tmp_path / "megablocks.txt").write_text("build exit status 1 (log: megablocks_build.log); import failed\n")
    settings = {"shape": "cpu", "layers": 2, "tokens": 256, "dtype": "bfloat16", "device": "cuda", "compile": False}
    targets = [
        {"target": "perft-s step [ids] <= 1.02", "paired": "1.010 [0.990, 1.030]", "verdict": "undecided"},
        {"target": "perft-e decode <= 1.05", "paired": "1.100 [1.060, 1.200]", "verdict": "missed"},
    ]
    (tmp_path / "olmoe_eager.json").write_text(json.dumps({"settings": settings, "targets": targets}))
    table = gpu_report.report(tmp_path)
    lines = table.splitlines()
    assert lines[0] == "| check | expected | measured | verdict |"
    compiled_tests = next(line for line in lines if "tests/test_compile.py" in line)
    assert "2 passed, 0 failed, 1 skipped (skipped: needs a CUDA device)" in compiled_tests
    assert "passed, with skips" in compiled_tests
    assert sum("no report" in line and "| not run |" in line for line in lines) == 3  # bf16, meta, dispatch
    assert "import failed" in next(line for line in lines if line.startswith("| MegaBlocks"))
    assert "| no result (olmoe_compiled.json) | not run |" in table
    counts = gpu_prediction.config_counts(olmoe_step.model_config("cpu", 2))
    rank, routed, top_k = olmoe_step.RANK, olmoe_step.R_EXPERTS, olmoe_step.R_TOP_K
    s_adapter = gpu_prediction.adapter_counts(counts, "S", rank, routed=routed, top_k=top_k, dense=1)
    e_adapter = gpu_prediction.adapter_counts(counts, "E", rank, routed=routed, top_k=top_k, dense=0)
    step_row = next(line for line in lines if line.startswith("| perft-s step [ids]"))
    assert f"<= 1.02; H200 roofline {gpu_prediction.step_overhead(counts, s_adapter, 256):.3f}" in step_row
    assert "| 1.010 [0.990, 1.030] | undecided |" in step_row
    decode_row = next(line for line in lines if line.startswith("| perft-e decode"))
    assert f"H200 roofline {gpu_prediction.decode_overhead(counts, e_adapter):.3f}" in decode_row
    assert "(bfloat16, cuda)" in decode_row and decode_row.endswith("| missed |")
