"""Bad input to train_sd.py and sample.py: one `error: ...` line on stderr, exit status 2, no traceback.

Most cases call each script's main() through common.run_cli, the wrapper its `__main__` block uses,
so they need no new Python process. A few run the scripts as subprocesses to check the real exit
status and stderr end to end.
"""

import sys

import pytest
import torch

import common
import sample
import train_sd
from helpers import error_lines, run_script

UNREACHABLE_MODEL = "unhype-tests/no-such-model"


def run_main(module, argv, monkeypatch, capsys):
    """Run a script's main() with argv through common.run_cli; return (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    status = common.run_cli(module.main)
    return status, error_lines(capsys.readouterr().err)


def assert_one_error_line(status, lines, expected):
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert expected in lines[0]


@pytest.mark.parametrize("concept", ["", "   ", "\t\n"])
def test_train_empty_concept(concept, tiny_sd_dir, monkeypatch, capsys):
    status, lines = run_main(train_sd, ["--model", tiny_sd_dir, "--concept", concept], monkeypatch, capsys)

    assert_one_error_line(status, lines, "empty concept")


def test_train_concept_checked_before_model(monkeypatch, capsys):
    # The model id cannot load, so the concept error proves the concept is checked first.
    status, lines = run_main(train_sd, ["--model", UNREACHABLE_MODEL, "--concept", " "], monkeypatch, capsys)

    assert_one_error_line(status, lines, "empty concept")


def test_train_csv_without_concept_column(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    concepts_file = tmp_path / "concepts.csv"
    concepts_file.write_text("name,anchor\nvan gogh,a painter\n", encoding="utf-8")

    status, lines = run_main(train_sd, ["--model", tiny_sd_dir, "--concepts-file", concepts_file], monkeypatch, capsys)

    assert_one_error_line(status, lines, f"invalid concepts file {concepts_file}")
    assert "'concept' column" in lines[0]


def test_train_missing_concepts_file(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.csv"

    status, lines = run_main(train_sd, ["--model", tiny_sd_dir, "--concepts-file", missing], monkeypatch, capsys)

    assert_one_error_line(status, lines, f"concepts file not found: {missing}")


def test_csv_quoted_comma_parsed(tmp_path):
    concepts_file = tmp_path / "concepts.csv"
    concepts_file.write_text('concept,anchor\n"van gogh, early period",a painter\ncircle,\n', encoding="utf-8")

    pairs = common.read_concepts_file(concepts_file)

    assert pairs == [("van gogh, early period", "a painter"), ("circle", "")]


def test_train_csv_quoted_comma_concept(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    concepts_file = tmp_path / "concepts.csv"
    concepts_file.write_text('concept,anchor\n"red circle, small",a square\n', encoding="utf-8")
    checkpoint = tmp_path / "ckpt.pt"
    argv = [
        "--model", tiny_sd_dir, "--concepts-file", concepts_file, "--objective", "direct", "--steps", 1,
        "--hidden-dim", 32, "--trajectory-steps", 4, "--sampling-steps", 2, "--out", checkpoint,
    ]  # fmt: skip

    status, _ = run_main(train_sd, argv, monkeypatch, capsys)

    assert status == 0
    config = common.load_checkpoint(checkpoint)["config"]
    assert config["concepts"] == [["red circle, small", "a square"]]
    assert "a painting by red circle, small" in config["erase_prompts"]


def test_train_unknown_target(tiny_sd_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_sd.py", "--model", str(tiny_sd_dir), "--concept", "circle", "--target", "mlp"])

    with pytest.raises(SystemExit) as exit_info:
        train_sd.main()

    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "invalid choice: 'mlp'" in message
    for target in ("xattn", "attn", "noxattn"):
        assert target in message


def test_train_missing_resume_checkpoint(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.pt"
    argv = ["--model", tiny_sd_dir, "--concept", "circle", "--hidden-dim", 32, "--resume", missing]

    status, lines = run_main(train_sd, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, f"checkpoint not found: {missing}")


def test_sample_missing_checkpoint(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.pt"

    status, lines = run_main(sample, ["--hypernet", missing, "--prompt", "a red circle"], monkeypatch, capsys)

    assert_one_error_line(status, lines, f"checkpoint not found: {missing}")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_sample_corrupt_checkpoint(content, tmp_path, monkeypatch, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(content)

    status, lines = run_main(sample, ["--hypernet", corrupt, "--prompt", "a red circle"], monkeypatch, capsys)

    assert_one_error_line(status, lines, f"invalid checkpoint {corrupt}")


def test_sample_foreign_torch_file(tmp_path, monkeypatch, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)

    status, lines = run_main(sample, ["--hypernet", foreign, "--prompt", "a red circle"], monkeypatch, capsys)

    assert_one_error_line(status, lines, "not an unhype checkpoint")


def test_sample_other_layer_shapes(direct_run, tiny_sd_dir, tiny_sd_other_shapes_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = direct_run
    argv = ["--hypernet", checkpoint, "--model", tiny_sd_other_shapes_dir, "--prompt", "a red circle",
            "--out-dir", tmp_path]  # fmt: skip

    status, lines = run_main(sample, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, f"checkpoint {checkpoint} was trained for {tiny_sd_dir}")
    assert f"does not fit {tiny_sd_other_shapes_dir}" in lines[0]


def test_sample_sd_checkpoint_on_flux_folder(direct_run, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = direct_run
    argv = ["--hypernet", checkpoint, "--model", tiny_flux_dir, "--prompt", "a red circle", "--out-dir", tmp_path]

    status, lines = run_main(sample, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, "is a Flux model")


def test_sample_no_prompt(monkeypatch, capsys):
    status, lines = run_main(sample, ["--model", "unused"], monkeypatch, capsys)

    assert_one_error_line(status, lines, "no prompt")


def test_fp16_on_cpu_rejected(tiny_sd_dir, monkeypatch, capsys):
    argv = ["--model", tiny_sd_dir, "--concept", "circle", "--device", "cpu", "--dtype", "fp16"]

    status, lines = run_main(train_sd, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, "fp16 needs a CUDA device")


def test_static_with_fields_rejected(tiny_sd_dir, monkeypatch, capsys):
    argv = ["--model", tiny_sd_dir, "--concept", "circle", "--static", "--objective", "fields"]

    status, lines = run_main(train_sd, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, "--static trains one LoRA for all prompts")


def test_train_no_concept(tiny_sd_dir, monkeypatch, capsys):
    status, lines = run_main(train_sd, ["--model", tiny_sd_dir], monkeypatch, capsys)

    assert_one_error_line(status, lines, "no concept to erase")


# The subprocess cases: the real exit status and stderr of the scripts.


def test_script_unreachable_hub_model():
    result = run_script("train_sd.py", "--model", UNREACHABLE_MODEL, "--concept", "circle")

    lines = error_lines(result.stderr)
    assert result.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: could not load model '{UNREACHABLE_MODEL}'")
    assert "Pass a local folder with --model PATH" in lines[0]


def test_script_empty_concept(tiny_sd_dir):
    result = run_script("train_sd.py", "--model", tiny_sd_dir, "--concept", "  ")

    assert result.returncode == 2
    assert error_lines(result.stderr) == ['error: empty concept: give a name such as --concept "van gogh"']


def test_script_corrupt_checkpoint(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")

    result = run_script("sample.py", "--hypernet", corrupt, "--prompt", "a red circle")

    lines = error_lines(result.stderr)
    assert result.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: invalid checkpoint {corrupt}")
