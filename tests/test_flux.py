"""Tests of train_flux.py and of Flux checkpoints in sample.py, on the tiny FLUX.1-dev-shaped model.

The tiny transformer has one double-stream and one single-stream block, so the `vo` target set has five
layers. Images are 16x16 pixels (16 packed image tokens) and T5 prompts are 8 tokens long.
"""

import sys

import pytest
import torch
import torch.utils.checkpoint
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

import common
import sample
import train_flux
import trainer
from helpers import error_lines, measure_task_loss_around_training, run_script
from lora_inject import TARGET_SETS, clear_lora_factors, inject_lora, set_lora_factors

RESOLUTION = 16
MAX_SEQUENCE_LENGTH = 8
FLUX_TRAIN_ARGS = (
    "--concept", "circle",
    "--anchor", "square",
    "--no-builtin-retain",
    "--retain", "a red square",
    "--retain", "a blue star",
    "--hidden-dim", "32",
    "--trajectory-steps", "4",
    "--max-jump", "2",
    "--sampling-steps", "3",
    "--resolution", str(RESOLUTION),
    "--max-sequence-length", str(MAX_SEQUENCE_LENGTH),
    "--log-every", "1",
)  # fmt: skip

# Measured with the run in test_direct_run_lowers_task_loss (40 direct steps, lr 1e-2, retain weight 0)
# for seeds 0 to 4: the task loss on a fixed batch fell to between 0.77 and 0.81 of its start.
MAX_TASK_LOSS_RATIO = 0.9


def run_main(module, argv, monkeypatch, capsys):
    """Run a script's main() with argv through common.run_cli, and return (exit status, stdout, stderr lines)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    status = common.run_cli(module.main)
    captured = capsys.readouterr()
    return status, captured.out, error_lines(captured.err)


def assert_one_error_line(status, lines, expected):
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert expected in lines[0]


@pytest.fixture(scope="module")
def flux_run(tiny_flux_dir, tmp_path_factory):
    """A finished 4-step train_flux.py run of the fields objective: (CompletedProcess, checkpoint path)."""
    checkpoint = tmp_path_factory.mktemp("flux_run") / "ckpt.pt"
    result = run_script("train_flux.py", "--model", tiny_flux_dir, *FLUX_TRAIN_ARGS, "--objective", "fields",
                        "--steps", 4, "--out", checkpoint)
    return result, checkpoint


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    return common.load_pipeline(tiny_flux_dir, "flux")


def transformer_inputs(transformer, batch=2, seed=0):
    """Random inputs for the tiny transformer: 16 packed image tokens and 8 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(batch, 16, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(batch, MAX_SEQUENCE_LENGTH, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.9, 0.4]),
        guidance=torch.full((batch,), 3.5),
        img_ids=FluxPipeline._prepare_latent_image_ids(None, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3),
        return_dict=False,
    )


@pytest.mark.parametrize("target", list(TARGET_SETS["flux"]))
def test_zero_factors_bit_identical(tiny_flux_dir, target):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer").eval()
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        layers = inject_lora(transformer, target, rank=4, alpha=4.0)
        generator = torch.Generator().manual_seed(1)

        # Random A with B = 0: the LoRA update is exactly zero.
        zero_B = {
            name: (torch.randn(2, 4, layer.in_features, generator=generator), torch.zeros(2, layer.out_features, 4))
            for name, layer in layers.items()
        }
        set_lora_factors(layers, zero_B)
        with_zero_B = transformer(**inputs)[0]

        # A nonzero B must change the output, or the comparison above proves nothing.
        nonzero_B = {name: (lora_A, torch.randn(lora_B.shape, generator=generator)) for name, (lora_A, lora_B) in zero_B.items()}
        set_lora_factors(layers, nonzero_B)
        with_lora = transformer(**inputs)[0]

        clear_lora_factors(layers)
        cleared = transformer(**inputs)[0]

    assert torch.equal(with_zero_B, expected)
    assert torch.equal(cleared, expected)
    assert not torch.allclose(with_lora, expected)


def lora_gradients(tiny_flux_dir, checkpointing):
    """Gradients of a loss on the transformer's output with respect to random LoRA factors.

    checkpointing is None, "default" (diffusers' own checkpoint function) or "lora"
    (trainer.lora_checkpoint_function). The factors are cleared before the backward pass, as
    ErasureTrainer clears them.
    """
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    layers = inject_lora(transformer, "attn", rank=4, alpha=4.0)
    if checkpointing == "default":
        transformer.enable_gradient_checkpointing()
    elif checkpointing == "lora":
        transformer.enable_gradient_checkpointing(trainer.lora_checkpoint_function(layers))
    generator = torch.Generator().manual_seed(2)
    factors = {
        name: (
            torch.randn(2, 4, layer.in_features, generator=generator, requires_grad=True),
            torch.randn(2, layer.out_features, 4, generator=generator, requires_grad=True),
        )
        for name, layer in layers.items()
    }
    set_lora_factors(layers, factors)
    output = transformer(**transformer_inputs(transformer))[0]
    clear_lora_factors(layers)
    leaves = [tensor for pair in factors.values() for tensor in pair]
    return torch.autograd.grad(output.pow(2).sum(), leaves)


def test_gradient_checkpointing_same_gradients(tiny_flux_dir):
    expected = lora_gradients(tiny_flux_dir, checkpointing=None)
    actual = lora_gradients(tiny_flux_dir, checkpointing="lora")

    # `attn` targets 8 layers of the double-stream block and 3 of the single-stream block.
    assert len(actual) == len(expected) == 2 * 11
    for actual_grad, expected_grad in zip(actual, expected):
        assert torch.equal(actual_grad, expected_grad)

    # diffusers' own checkpointing recomputes the blocks without the cleared factors, so it fails.
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        lora_gradients(tiny_flux_dir, checkpointing="default")


def test_sampler_matches_pipeline(flux_pipe):
    """x_t after k Euler steps equals FluxPipeline's latents after k steps, from the same seed."""
    steps, stop = 4, 2
    cond = train_flux.encode_prompts(flux_pipe, ["a red circle", "a blue square"], MAX_SEQUENCE_LENGTH, "cpu")
    denoiser = train_flux.FluxDenoiser(flux_pipe, RESOLUTION, steps, 3.5, MAX_SEQUENCE_LENGTH, "cpu")
    x_t, timesteps = denoiser.sample_x_t(cond, None, stop, torch.Generator().manual_seed(7))

    captured = {}

    def capture(pipe, step_index, timestep, callback_kwargs):
        if step_index == stop - 1:
            captured["latents"] = callback_kwargs["latents"].clone()
        return callback_kwargs

    flux_pipe(
        prompt_embeds=cond["prompt_embeds"],
        pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        callback_on_step_end=capture,
    )

    assert x_t.shape == (2, (RESOLUTION // 4) ** 2, 64)
    assert torch.equal(x_t, captured["latents"])
    assert torch.equal(timesteps, flux_pipe.scheduler.timesteps[stop].expand(2))


def test_direct_run_lowers_task_loss(tiny_flux_dir, tmp_path, monkeypatch, capsys):
    """Back-propagating the velocity task loss through the transformer lowers it.

    The tiny model's random CLIP encoder gives nearly the same pooled embedding to every prompt, so
    retention would pull the erase prompts' LoRA back to zero. --retain-weight 0 isolates the task loss.
    """
    argv = [
        "--model", tiny_flux_dir, *FLUX_TRAIN_ARGS, "--objective", "direct", "--steps", 40, "--lr", "1e-2",
        "--retain-weight", 0, "--log-every", 100, "--out", tmp_path / "ckpt.pt",
    ]  # fmt: skip
    measured = measure_task_loss_around_training(monkeypatch)
    status, _, lines = run_main(train_flux, argv, monkeypatch, capsys)

    assert status == 0, lines
    assert measured["after"] < MAX_TASK_LOSS_RATIO * measured["before"], measured


def test_run_writes_flux_checkpoint(flux_run, tiny_flux_dir):
    result, checkpoint = flux_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibrated --inner-lr" in result.stdout
    assert "step 4: task" in result.stdout
    assert f"saved {checkpoint}: mean |dW|" in result.stdout

    loaded = common.load_checkpoint(checkpoint)
    config = loaded["config"]
    assert loaded["step"] == 4
    assert config["family"] == "flux"
    assert config["target"] == "vo"
    assert config["concepts"] == [["circle", "square"]]
    assert config["args"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert config["args"]["dtype"] == "fp32"  # the default on a CPU
    # One double-stream block (to_v, to_out.0, add_v_proj, to_add_out) and one single-stream block (to_v).
    assert len(config["network"]["layer_shapes"]) == 5
    assert config["network"]["embed_dim"] == 16  # the tiny CLIP's pooled width


def test_checkpoint_round_trip(flux_run, tiny_flux_dir):
    _, checkpoint_path = flux_run
    checkpoint = common.load_checkpoint(checkpoint_path)
    network = common.network_from_checkpoint(checkpoint)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, checkpoint["network"][name]), name

    # Attached to a freshly loaded model, the network writes the same LoRA as the one rebuilt above.
    pipe = common.load_pipeline(tiny_flux_dir, "flux")
    layers, attached = common.attach_checkpoint(pipe, checkpoint, checkpoint_path, str(tiny_flux_dir))
    pooled = common.encode_pooled(pipe, ["a photo of circle"])
    expected = common.generate_factors(network, pooled)
    actual = common.generate_factors(attached, pooled)
    assert sorted(layers) == sorted(expected)
    for name in expected:
        assert torch.equal(actual[name][0], expected[name][0]), name
        assert torch.equal(actual[name][1], expected[name][1]), name


def test_resume_continues_run(flux_run, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = flux_run
    resumed = tmp_path / "resumed.pt"
    argv = [
        "--model", tiny_flux_dir, *FLUX_TRAIN_ARGS, "--steps", 6, "--resume", checkpoint, "--out", resumed,
        "--gradient-checkpointing",  # the same network, with less memory
    ]  # fmt: skip

    status, stdout, lines = run_main(train_flux, argv, monkeypatch, capsys)

    assert status == 0, lines
    assert f"resumed from {checkpoint} at step 4" in stdout
    assert "step 5: task" in stdout
    assert "step 4: task" not in stdout
    before, after = common.load_checkpoint(checkpoint), common.load_checkpoint(resumed)
    assert after["step"] == 6
    assert after["optimizer"]["state"]
    assert any(not torch.equal(after["network"][name], before["network"][name]) for name in before["network"])


def test_sample_end_to_end(flux_run, tmp_path):
    _, checkpoint = flux_run
    out_dir = tmp_path / "samples"
    prompts = ["a photo of circle", "a red square"]
    result = run_script(
        "sample.py", "--hypernet", checkpoint, "--prompt", prompts[0], "--prompt", prompts[1], "--num-images", 2,
        "--height", RESOLUTION, "--width", RESOLUTION, "--steps", 2, "--compare", "--out-dir", out_dir,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert "erases circle from" in result.stdout
    strength_lines = [line for line in result.stdout.splitlines() if line.startswith("|dW| =")]
    assert len(strength_lines) == 2
    for line, prompt in zip(strength_lines, prompts):
        assert line.endswith(f"  {prompt}")
    for name in ["a_photo_of_circle", "a_red_square"]:
        for seed in (0, 1):
            for suffix in ("", "_base"):
                image = Image.open(out_dir / f"{name}_{seed}{suffix}.png")
                assert image.size == (RESOLUTION, RESOLUTION)
    # Four rows (two prompts, two seeds) of labelled base and erased images.
    grid = Image.open(out_dir / "compare.png")
    pitch = common.GRID_MIN_CELL + common.GRID_GAP
    assert grid.size == (common.GRID_LABEL_WIDTH + 2 * pitch, common.GRID_HEADER + 4 * pitch)


def test_flux_checkpoint_on_sd_model_rejected(flux_run, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = flux_run
    argv = ["--hypernet", checkpoint, "--model", tiny_sd_dir, "--prompt", "a red circle", "--out-dir", tmp_path]

    status, _, lines = run_main(sample, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, f"checkpoint {checkpoint} was trained for")
    assert f"a Flux model, but {tiny_sd_dir} is a Stable Diffusion model" in lines[0]


def test_sd_checkpoint_on_flux_model_rejected(direct_run, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = direct_run
    argv = ["--hypernet", checkpoint, "--model", tiny_flux_dir, "--prompt", "a red circle", "--out-dir", tmp_path]

    status, _, lines = run_main(sample, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, "a Stable Diffusion model, but")
    assert f"{tiny_flux_dir} is a Flux model" in lines[0]


def test_train_flux_on_sd_model_rejected(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model", tiny_sd_dir, *FLUX_TRAIN_ARGS, "--out", tmp_path / "ckpt.pt"]

    status, _, lines = run_main(train_flux, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, "is a Stable Diffusion model, not a Flux model")


def test_resume_from_sd_checkpoint_rejected(direct_run, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    _, checkpoint = direct_run
    argv = ["--model", tiny_flux_dir, *FLUX_TRAIN_ARGS, "--resume", checkpoint, "--out", tmp_path / "ckpt.pt"]

    status, _, lines = run_main(train_flux, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, f"cannot resume from {checkpoint}")
    assert "a Stable Diffusion model, and train_flux.py trains Flux models" in lines[0]


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--resolution", 18, "--resolution must be a multiple of 4"),
        ("--resolution", 0, "--resolution must be at least 1"),
        ("--max-sequence-length", 513, "--max-sequence-length must be at most 512"),
        ("--sampling-steps", 0, "--sampling-steps must be at least 1"),
        ("--guidance", "nan", "invalid --guidance nan"),
    ],
)
def test_invalid_flux_option(option, value, expected, tiny_flux_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model", tiny_flux_dir, *FLUX_TRAIN_ARGS, option, value, "--out", tmp_path / "ckpt.pt"]

    status, _, lines = run_main(train_flux, argv, monkeypatch, capsys)

    assert_one_error_line(status, lines, expected)


def test_help_names_bf16_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_flux.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        train_flux.parse_args()
    help_text = " ".join(capsys.readouterr().out.split())

    assert exit_info.value.code == 0
    assert "default: bf16 on CUDA" in help_text
