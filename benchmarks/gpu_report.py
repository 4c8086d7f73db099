"""The one table of a GPU session (scripts/gpu_session.sh): every check it ran, what was expected, what came out.

Reads what the session left in its results folder and writes ``gpu_session.md`` there:

- ``tests_<group>.xml``: pytest's JUnit reports of the test groups (compiled paths and CUDA-graph decode, bf16,
  meta-device flow, dispatch backends): passed / failed / skipped, with the skip reasons (a CUDA test skipped on
  the GPU machine is a finding, not a pass);
- ``megablocks.txt``: the MegaBlocks build's exit status and whether it imports;
- ``olmoe_eager.json`` and ``olmoe_compiled.json``: benchmarks/olmoe_step.py's runs; each target's paired median
  and verdict, beside the H200 roofline overhead that benchmarks/gpu_prediction.py predicts for the same model
  (config, layers, tokens per step and PERFT settings read from the run).

A missing file is a row that says so (the step timed out or crashed; its log is beside it).

    python benchmarks/gpu_report.py RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import gpu_prediction
import olmoe_step

TEST_GROUPS = {
    "compile": "compiled paths, CUDA-graph decode (tests/test_compile.py)",
    "bf16": "bf16 end to end (tests/test_bf16.py)",
    "meta": "meta-device flow (tests/test_meta_device*.py, tests/test_gpu_checks.py)",
    "dispatch": "dispatch backends on CUDA, MegaBlocks (tests/test_dispatch.py)",
}
BENCHMARKS = {"eager": "olmoe_eager.json", "compiled": "olmoe_compiled.json"}
DENSE_EXPERTS = {"perft-d": 2, "perft-s": 1}
"""PERFT-D's and -S's adapter experts in olmoe_step.py (its ``floors``)."""


@dataclass(frozen=True)
class Row:
    check: str
    expected: str
    measured: str
    verdict: str

    def markdown(self) -> str:
        return f"| {self.check} | {self.expected} | {self.measured} | {self.verdict} |"


def test_row(group: str, report: Path) -> Row:
    """One test group's outcome from its JUnit report; skips count against it on the GPU machine."""
    if not report.exists():
        return Row(TEST_GROUPS[group], "all pass, none skipped", f"no report ({report.name})", "not run")
    suites = ElementTree.parse(report).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    reasons = sorted({skip.get("message", "") for skip in suite.iter("skipped")})
    measured = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if reasons:
        measured += " (skipped: " + "; ".join(reasons) + ")"
    if counts["failures"] or counts["errors"]:
        verdict = "**failed**"
    else:
        verdict = "passed" if not counts["skipped"] else "passed, with skips"
    return Row(TEST_GROUPS[group], "all pass, none skipped", measured, verdict)


def megablocks_row(status: Path) -> Row:
    """The build's exit status and the import check, as the session wrote them."""
    measured = " ".join(status.read_text().split()) if status.exists() else f"no status ({status.name})"
    verdict = "installs" if "import ok" in measured else "does not install here"
    return Row("MegaBlocks 0.10 built from source against this torch", "imports", measured, verdict)


def predicted_overheads(settings: dict) -> dict[str, tuple[float, float]]:
    """H200 roofline (step, decode) overhead per PERFT variant for the benchmark's own model and step size."""
    config = olmoe_step.model_config(settings["shape"], settings["layers"])
    counts = gpu_prediction.config_counts(config)
    overheads = {}
    for name in ("perft-r", "perft-e", "perft-d", "perft-s"):
        variant = name[-1].upper()
        adapter = gpu_prediction.adapter_counts(
            counts,
            variant,
            olmoe_step.RANK,
            routed=olmoe_step.R_EXPERTS,
            top_k=olmoe_step.R_TOP_K,
            dense=DENSE_EXPERTS.get(name, 0),
        )
        overheads[name] = (
            gpu_prediction.step_overhead(counts, adapter, settings["tokens"]),
            gpu_prediction.decode_overhead(counts, adapter),
        )
    return overheads


def benchmark_rows(label: str, run: Path) -> list[Row]:
    """Every target of one olmoe_step run: its paired median and verdict, beside the roofline prediction."""
    if not run.exists():
        return [Row(f"OLMoE-shaped benchmark, {label}", "-", f"no result ({run.name})", "not run")]
    summary = json.loads(run.read_text())
    settings = summary["settings"]
    predictions = predicted_overheads(settings)
    setup = f"{settings['dtype']}, {settings['device']}" + (
        f", compiled ({settings.get('compile_mode', 'default')})" if settings.get("compile") else ""
    )
    rows = []
    for target in summary["targets"]:
        what, sense, limit = target["target"].rsplit(" ", 2)  # "perft-r step [ids]", "<=", "1.04"
        expected = f"{sense} {limit}"
        prediction = predictions.get(what.split()[0])
        if prediction is not None:
            expected += f"; H200 roofline {prediction[1] if ' decode' in what else prediction[0]:.3f}"
        rows.append(Row(f"{what} ({setup})", expected, target["paired"], target["verdict"]))
    return rows


def report(results: Path) -> str:
    rows = [test_row(group, results / f"tests_{group}.xml") for group in TEST_GROUPS]
    rows.append(megablocks_row(results / "megablocks.txt"))
    for label, name in BENCHMARKS.items():
        rows.extend(benchmark_rows(label, results / name))
    lines = ["| check | expected | measured | verdict |", "|---|---|---|---|", *(row.markdown() for row in rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the session's results folder ($OUT)")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    table = report(args.results)
    (args.results / "gpu_session.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
