"""`peft-perft` fails early and clearly: every mistake is one line with exit status 2, found before anything loads.

The subprocess tests run the command as a user does; the rest call `peft_perft.cli.main` in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import build_tiny, char_tokenizer
from peft import get_peft_model

import peft_perft
from peft_perft import PerftConfig
from peft_perft.cli import SUBCOMMANDS, HelpFormatter, build_parser, main
from peft_perft.evaluation import load_task_records, resolve_tasks

FIXTURES = Path(__file__).parent / "fixtures" / "llm_adapters"
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, so every request is refused at once


def run_command(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment.pop("PEFT_PERFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "peft_perft.cli", *args], capture_output=True, text=True, timeout=180, env=environment
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peft-perft "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"peft-perft {peft_perft.__version__}"


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_neither_torch_nor_peft(flag: str) -> None:
    """The console script's module answers these without the seconds-long import of peft, torch and transformers."""
    script = (
        "import json, sys, peft_perft_cli\n"
        "try:\n"
        "    peft_perft_cli.main([sys.argv[1]])\n"
        "except SystemExit as exited:\n"
        "    assert exited.code == 0, exited.code\n"
        "print(json.dumps(sorted(set(sys.modules) & {'peft', 'peft_perft', 'torch', 'transformers'})))"
    )
    result = subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert "peft-perft" in result.stdout and ("COMMAND" in result.stdout or peft_perft.__version__ in result.stdout)


def test_readme_demo_flags_fail_in_seconds_with_what_to_do(tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = run_command("demo", "--variant", "E", "--r", "16", "--num-experts", "4", "--output-dir", str(output))
    assert_one_line_error(result, "--num-experts 4 does not apply to --variant E", "Drop --num-experts")
    assert not output.exists()  # nothing was built, trained or written


def test_unreachable_hub_fails_fast_and_says_how_to_use_a_local_path(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_command(
        "eval", "--model", "someone/some-moe", "--data-dir", str(FIXTURES), HF_ENDPOINT=UNREACHABLE_HUB
    )
    assert_one_line_error(result, "--model someone/some-moe: could not reach the Hugging Face Hub", "--model path/to/")
    assert time.perf_counter() - started < 60  # without the check: about 50 s of retries, then a traceback


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_explains_every_flag_with_its_default(command: str) -> None:
    subparser = next(action for action in build_parser(command)._actions if action.dest == "command").choices[command]
    formatter = HelpFormatter(prog=f"peft-perft {command}")
    for action in subparser._actions:
        if action.dest == "help":
            continue
        shown = formatter._get_help_string(action)
        assert action.help, f"{command} {action.option_strings} has no help"
        if not action.required and action.nargs != 0:
            assert "default" in shown, f"{command} {action.option_strings}: {shown!r} does not say its default"
        # One way for every flag: a single "(default: X)" at the end, not after another parenthesis.
        mentions = re.findall(r"default", shown)
        assert len(mentions) <= 1, f"{command} {action.option_strings}: {shown!r} says 'default' twice"
        if mentions:
            assert re.search(r"[^)] \(default: [^()]*\)$", shown), f"{command} {action.option_strings}: {shown!r}"
    if command == "demo":
        assert "optimizer steps (default: 800)" in " ".join(subparser.format_help().split())


def test_every_input_mistake_is_one_line_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    monkeypatch.delenv("PEFT_PERFT_DEBUG", raising=False)
    model_dir, weights_only_dir = tmp_path / "model", tmp_path / "weights-only"
    build_tiny().save_pretrained(model_dir)
    char_tokenizer("abc").save_pretrained(model_dir)
    build_tiny().save_pretrained(weights_only_dir)
    broken_adapter = tmp_path / "adapter"
    get_peft_model(build_tiny(), PerftConfig(r=2)).save_pretrained(broken_adapter)
    (broken_adapter / "adapter_config.json").write_text('{"peft_type": "PERFT", "r": ')
    cases = {
        ("demo", "--steps", "0"): "--steps 0 is invalid",
        ("demo", "--variant", "S", "--top-k", "2"): "--top-k 2 applies only to --variant R",
        ("demo", "--dataset", str(tmp_path / "missing.json")): "no such file or folder",
        ("demo", "--model", "someone/not-cached"): "not in the local Hub cache and HF_HUB_OFFLINE is set",
        ("eval", "--model", str(tmp_path), "--data-dir", str(FIXTURES)): "has no config.json",
        ("eval", "--model", str(weights_only_dir), "--data-dir", str(FIXTURES)): "the model folder has no tokenizer",
        ("eval", "--model", str(model_dir), "--tokenizer", str(tmp_path / "nothing"), "--data-dir", str(FIXTURES)): (
            "no such folder"
        ),
        ("eval", "--model", str(model_dir), "--adapter", str(broken_adapter), "--data-dir", str(FIXTURES)): (
            "adapter_config.json is not valid JSON"
        ),
        ("eval", "--model", str(model_dir), "--data-dir", str(tmp_path)): "No <task>/test.json files under",
        ("pilot", "--test-files", str(tmp_path)): "--test-files",
        ("pilot", "--max-steps", "2"): "leaves no timed step",
    }
    capsys.readouterr()  # the progress bars of saving the fixtures above
    for argv, expected in cases.items():
        assert main(list(argv)) == 2, argv
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"peft-perft {argv[0]}: error: ") and expected in error, (argv, error)
        assert "\n" not in error and "Traceback" not in error, error


def test_one_task_folder_is_a_test_source() -> None:
    """`--data-dir dataset/boolq` and `--test-files dataset/boolq`, as the README writes them."""
    folder = FIXTURES / "boolq"
    assert resolve_tasks(None, folder) == ["boolq"]
    expected = json.loads((folder / "test.json").read_text())
    assert load_task_records("boolq", folder) == expected
    with pytest.raises(ValueError, match="holds a single test file"):
        resolve_tasks(["boolq", "piqa"], folder)


def test_demo_refuses_text_its_tokenizer_cannot_represent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [{"prompt": f"copy: abc{index} => ", "completion": f"abc{index}"} for index in range(20)]
    records[7]["completion"] = "Hello, world!"  # ',' and '!' are not in the bundled 69-character alphabet
    data = tmp_path / "my.json"
    data.write_text(json.dumps(records))
    assert main(["demo", "--dataset", str(data), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "1 of 20 records contain characters the tokenizer" in error and "'!,'" in error
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_error_carries_debug_traceback_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFT_PERFT_DEBUG", "1")
    with pytest.raises(ValueError, match=re.escape("--steps 0 is invalid")):
        main(["demo", "--steps", "0"])


@pytest.mark.parametrize(
    ("file_name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"), ("spaced.json", " [\n ]\n")],
)
def test_a_data_file_without_examples_is_named_in_one_line(
    file_name: str, content: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / file_name
    data.write_text(content)
    assert main(["demo", "--dataset", str(data), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("peft-perft demo: error: --dataset ") and str(data) in error, error
    assert "holds no examples" in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_a_dense_model_is_refused_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the config alone: the demo never reaches loading the weights or scoring the base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_perft.demo.run as demo_run

    dense = tmp_path / "a-dense-llama"
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(dense)
    monkeypatch.setattr(demo_run, "_run_pipeline", lambda *args: pytest.fail("the demo ran before refusing the model"))
    capsys.readouterr()  # the progress bar of saving the model above
    assert main(["demo", "--model", str(dense), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"peft-perft demo: error: --model {dense} is a dense 'llama' model"), error
    assert "\n" not in error and not (tmp_path / "out").exists()


def test_a_logging_backend_that_is_not_installed_is_refused_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])  # as without tensorboard
    assert main(["demo", "--report-to", "tensorboard", "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        "peft-perft demo: error: --report-to tensorboard: the tensorboard package is not installed. Install it "
        "(pip install tensorboard), or drop --report-to."
    )
    assert main(["demo", "--report-to", "tensorbord", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--report-to tensorbord is not a logging backend the Trainer knows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--varient", "R"], "unrecognized arguments: --varient R (did you mean --variant?)"),
        (["demo", "--variant", "X"], "argument --variant: invalid choice: 'X'"),
        (["demo", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["demo", "--learnig-rate=1e-3"], "(did you mean --learning-rate?)"),
    ],
)
def test_a_flag_mistake_is_one_line_with_the_closest_flag(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and "usage:" not in error, error
    assert error.startswith("peft-perft") and expected in error, error
    assert error.rstrip().endswith("--help' lists the flags")
