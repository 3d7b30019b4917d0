import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from tiny_models import make_tiny_flux, make_tiny_sd


def run_two_steps(pipe, prompt, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, output_type="pt", generator=generator, **kwargs).images


def test_tiny_sd_loads_and_samples(tmp_path):
    make_tiny_sd(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)

    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 2
    assert pipe.safety_checker is None

    images = run_two_steps(pipe, ["a red circle", "a blue square"], height=16, width=16)
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_tiny_sd2_like_config(tmp_path):
    make_tiny_sd(tmp_path, sd2_like=True)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)

    assert pipe.unet.config.use_linear_projection
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    images = run_two_steps(pipe, "a red circle")
    assert images.shape == (1, 3, 16, 16)


def test_tiny_sd_encode_prompt_shapes(tmp_path):
    make_tiny_sd(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)

    prompt_embeds, negative_embeds = pipe.encode_prompt(
        ["a red circle", "a blue square"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    assert prompt_embeds.shape == (2, 16, 16)
    assert negative_embeds.shape == (2, 16, 16)


def test_tiny_flux_loads_and_samples(tmp_path):
    make_tiny_flux(tmp_path)
    pipe = FluxPipeline.from_pretrained(tmp_path)

    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.use_dynamic_shifting

    images = run_two_steps(
        pipe, ["a red circle", "a blue square"], height=16, width=16, guidance_scale=3.5, max_sequence_length=16
    )
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all()


def test_tiny_flux_encode_prompt_shapes(tmp_path):
    make_tiny_flux(tmp_path)
    pipe = FluxPipeline.from_pretrained(tmp_path)

    prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(["a red circle", "a blue square"], max_sequence_length=16)
    assert prompt_embeds.shape == (2, 16, pipe.text_encoder_2.config.d_model)
    assert pooled_embeds.shape == (2, pipe.text_encoder.config.hidden_size)
    assert text_ids.shape == (16, 3)


def test_tiny_flux_t5_tokenizer_round_trip(tmp_path):
    built = make_tiny_flux(tmp_path)
    loaded = FluxPipeline.from_pretrained(tmp_path)

    for prompt in ["a red circle", "a purple hexagon"]:
        built_ids = built.tokenizer_2(prompt).input_ids
        assert loaded.tokenizer_2(prompt).input_ids == built_ids
        assert built_ids[-1] == loaded.tokenizer_2.eos_token_id

    # Words in the vocabulary are one token each, followed by </s>.
    assert len(loaded.tokenizer_2("a red circle").input_ids) == 4


def test_builders_deterministic_by_seed(tmp_path):
    first = make_tiny_sd(tmp_path / "first", seed=0).unet.state_dict()
    again = make_tiny_sd(tmp_path / "again", seed=0).unet.state_dict()
    other = make_tiny_sd(tmp_path / "other", seed=1).unet.state_dict()

    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)

    flux_first = make_tiny_flux(tmp_path / "flux_first", seed=0).transformer.state_dict()
    flux_again = make_tiny_flux(tmp_path / "flux_again", seed=0).transformer.state_dict()
    assert all(torch.equal(flux_first[name], flux_again[name]) for name in flux_first)


def test_builders_keep_global_random_state(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)

    torch.manual_seed(123)
    make_tiny_sd(tmp_path / "sd")
    make_tiny_flux(tmp_path / "flux")
    assert torch.equal(torch.rand(3), expected)
