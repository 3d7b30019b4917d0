"""Train with train_sd.py, then render with sample.py, both as a user runs them."""

from PIL import Image

import common
from helpers import run_script

PROMPTS = ("a red circle", "a blue square")
FILE_STEMS = ("a_red_circle_0", "a_blue_square_0")


def test_train_then_sample_compare(direct_run, tmp_path):
    train_result, checkpoint = direct_run
    assert train_result.returncode == 0, train_result.stderr[-3000:]
    out_dir = tmp_path / "samples"

    result = run_script(
        "sample.py", "--hypernet", checkpoint, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
        "--compare", "--steps", 2, "--out-dir", out_dir,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{checkpoint}: erases circle from" in result.stdout
    for prompt in PROMPTS:
        assert f"  {prompt}" in result.stdout
    assert result.stdout.count("|dW| =") == len(PROMPTS)

    expected = {f"{stem}{suffix}.png" for stem in FILE_STEMS for suffix in ("", "_base")} | {"compare.png"}
    assert {path.name for path in out_dir.iterdir()} == expected
    for stem in FILE_STEMS:
        with Image.open(out_dir / f"{stem}.png") as image:
            assert image.size == (16, 16)
    with Image.open(out_dir / "compare.png") as grid:
        # Rows of labelled base and erased images, one per prompt and seed, enlarged to the minimum cell.
        pitch = common.GRID_MIN_CELL + common.GRID_GAP
        assert grid.width == common.GRID_LABEL_WIDTH + 2 * pitch
        assert grid.height == common.GRID_HEADER + len(FILE_STEMS) * pitch
