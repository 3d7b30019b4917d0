"""The README's first run on the shipped toy model, checked by the toy world's oracle.

This is the test that shows erasure really happens. It trains a hypernetwork with the README's own
command and samples with the README's own command, a few minutes on 2 CPU cores. Then it renders circle,
disc and square prompts from unseen seeds with and without the generated LoRA.
"""

import re
import shlex
import subprocess

import pytest
import torch

import common
import toy_world
from helpers import REPO_DIR, script_env
from lora_inject import clear_lora_factors, set_lora_factors

SEEDS = list(range(500, 508))  # training draws its noise from seed 0; these seeds are never seen
COLOURS = [name for names in toy_world.COLOURS.values() for name in names]

# Measured with the toy preset on the shipped model, 4 seeds, this template and "a {colour} {shape}":
# circles on circle prompts fell from 1.00 to 0.00 and on disc prompts from 1.00 to 0.00. Prompts
# naming other shapes kept their shape accuracy of 1.00, with a mean pixel difference of 0.0002. The
# margins leave room for other seeds and platforms.
MAX_ERASED_CIRCLE_RATE = 0.10
MAX_SYNONYM_CIRCLE_RATE = 0.15
MIN_SQUARE_ACCURACY_RATIO = 0.9
MAX_SQUARE_PIXEL_DIFFERENCE = 0.01


def readme_commands():
    """The two commands of the README's first-run section, as a user would paste them."""
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    section = readme.split("## First run", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^    (python .+)$", section, flags=re.MULTILINE)
    return commands[0], commands[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run the README's train and sample commands in a fresh folder; return that folder."""
    folder = tmp_path_factory.mktemp("first_run")
    for command in readme_commands():
        arguments = shlex.split(command)
        arguments[1] = str(REPO_DIR / arguments[1])  # the scripts live in the repository, the outputs here
        result = subprocess.run(arguments, cwd=folder, env=script_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-2000:]
    return folder


def render(pipe, layers, network, scale, prompts, erased):
    """Render every prompt at SEEDS, with the generated LoRA if `erased`; images (n, 3, 16, 16)."""
    generators = [torch.Generator().manual_seed(seed) for _ in prompts for seed in SEEDS]
    if erased:
        pooled = common.encode_pooled(pipe, prompts)
        factors = common.generate_factors(network, pooled)
        per_image = {name: (A.repeat_interleave(len(SEEDS), 0), B.repeat_interleave(len(SEEDS), 0)) for name, (A, B) in factors.items()}
        set_lora_factors(layers, per_image)
    images = pipe(prompts, num_images_per_prompt=len(SEEDS), num_inference_steps=25, guidance_scale=4.0,
                  generator=generators, output_type="pt").images
    clear_lora_factors(layers)
    return images


def test_readme_commands_write_outputs(trained):
    assert (trained / "ckpt.pt").is_file()
    assert (trained / "samples" / "compare.png").is_file()


def test_toy_circle_erased_square_kept(trained):
    torch.set_num_threads(2)
    pipe = common.load_pipeline("toy", "sd")
    checkpoint = common.load_checkpoint(trained / "ckpt.pt")
    layers, network = common.attach_checkpoint(pipe, checkpoint, trained / "ckpt.pt", "toy")
    scale = checkpoint["config"]["alpha"] / checkpoint["config"]["rank"]
    circle = toy_world.SHAPE_NAMES.index("circle")
    square = toy_world.SHAPE_NAMES.index("square")

    images = {}
    for shape_name in ("circle", "disc", "square"):
        prompts = [f"a photo of a {colour} {shape_name}" for colour in COLOURS]  # the held-out template
        for erased in (False, True):
            images[shape_name, erased] = render(pipe, layers, network, scale, prompts, erased)

    def rate(key, shape_id):
        shapes, _ = toy_world.classify(images[key])
        return (shapes == shape_id).float().mean().item()

    assert rate(("circle", False), circle) > 0.5, "the base model should draw circles for circle prompts"
    assert rate(("circle", True), circle) <= MAX_ERASED_CIRCLE_RATE
    assert rate(("disc", True), circle) <= MAX_SYNONYM_CIRCLE_RATE
    assert rate(("square", True), square) >= MIN_SQUARE_ACCURACY_RATIO * rate(("square", False), square)
    difference = (images["square", False] - images["square", True]).abs().mean().item()
    assert difference <= MAX_SQUARE_PIXEL_DIFFERENCE
