"""Tests of the toy world: renderer, oracle, tokenizer and the shipped toy_model pipeline."""

import itertools
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

import toy_world
from toy_world import COLOUR_NAMES, SHAPE_NAMES, UNRECOGNISED, classify, render, sample_layouts

TOY_MODEL = Path(__file__).resolve().parent.parent / "toy_model"
PAIRS = list(itertools.product(range(len(SHAPE_NAMES)), range(len(COLOUR_NAMES))))

# The shipped model gets all 9 pictures of this sample right, and 100% of the 432 samples of
# `python toy_world.py check toy_model`. The margins allow for floating-point differences between
# machines and still fail a broken model, which scores about 1/3 (chance).
MIN_SAMPLED_SHAPE_ACCURACY = 7 / 9
MIN_SAMPLED_COLOUR_ACCURACY = 8 / 9


@pytest.fixture(autouse=True)
def few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipeline():
    if not (TOY_MODEL / "model_index.json").exists():
        pytest.fail(f"toy model not found at {TOY_MODEL}; train it with: python toy_world.py train --out toy_model")
    loaded = StableDiffusionPipeline.from_pretrained(TOY_MODEL)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize("shape_id,colour_id", PAIRS)
def test_oracle_exact_on_clean_renders(shape_id, colour_id):
    generator = torch.Generator().manual_seed(shape_id * 10 + colour_id)
    n = 300
    centres, half_extents = sample_layouts(n, generator)
    images = render(torch.full((n,), shape_id), torch.full((n,), colour_id), centres, half_extents)

    shape_ids, colour_ids = classify(images)

    assert (shape_ids == shape_id).float().mean() >= 0.99
    assert (colour_ids == colour_id).float().mean() >= 0.99


def test_oracle_rejects_empty_picture():
    black = torch.zeros(2, 3, toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)
    black[1] += 0.05  # faint haze below the background floor

    shape_ids, colour_ids = classify(black)

    assert shape_ids.tolist() == [UNRECOGNISED, UNRECOGNISED]
    assert colour_ids.tolist() == [UNRECOGNISED, UNRECOGNISED]


def test_oracle_rejects_mixed_colour():
    generator = torch.Generator().manual_seed(0)
    centres, half_extents = sample_layouts(1, generator)
    red = render(torch.tensor([0]), torch.tensor([0]), centres, half_extents)
    yellow = red + red.roll(1, dims=1)  # equal red and green

    _, colour_ids = classify(yellow)

    assert colour_ids.tolist() == [UNRECOGNISED]


def test_oracle_tolerates_blur_and_noise():
    generator = torch.Generator().manual_seed(1)
    n = 300
    images, shapes, colours = toy_world.sample_pictures(n, generator)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(images, kernel, padding=1, groups=3)
    noisy = (blurred + 0.05 * torch.randn(blurred.shape, generator=generator)).clamp(0, 1)

    shape_ids, colour_ids = classify(noisy)

    assert (shape_ids == shapes).float().mean() >= 0.95
    assert (colour_ids == colours).float().mean() >= 0.99


def test_tokenizer_round_trip(tmp_path):
    tokenizer = toy_world.build_tokenizer(toy_world.toy_words(), toy_world.MAX_TEXT_LENGTH)
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    captions = [row[0] for row in toy_world.prompt_table(toy_world.TEMPLATES, seeds=(0,))] + [""]

    assert toy_world.tokenize(reloaded, captions).tolist() == toy_world.tokenize(tokenizer, captions).tolist()
    assert reloaded.model_max_length == toy_world.MAX_TEXT_LENGTH


def test_tokenizer_keeps_words_whole():
    tokenizer = toy_world.build_tokenizer(toy_world.toy_words(), toy_world.MAX_TEXT_LENGTH)

    for word in toy_world.toy_words():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, f"{word!r} splits into {ids}"
        assert ids[0] == tokenizer.bos_token_id == 0
        assert ids[-1] == tokenizer.eos_token_id == 1


def test_pooler_output_taken_at_eos():
    tokenizer = toy_world.build_tokenizer(toy_world.toy_words(), toy_world.MAX_TEXT_LENGTH)
    text_encoder = toy_world.build_text_encoder(len(tokenizer))
    ids = toy_world.tokenize(tokenizer, ["a red circle", "a picture of a blue box"])

    with torch.no_grad():
        output = text_encoder(ids)

    eos_positions = [4, 7]  # BOS + words
    for row, position in enumerate(eos_positions):
        assert ids[row, position] == 1
        assert torch.equal(output.pooler_output[row], output.last_hidden_state[row, position])


def test_training_captions_cover_all_pairs():
    tokenizer = toy_world.build_tokenizer(toy_world.toy_words(), toy_world.MAX_TEXT_LENGTH)

    token_ids, shape_ids, colour_ids = toy_world.caption_table(tokenizer)

    assert len(token_ids) == len(PAIRS) * len(toy_world.TRAIN_TEMPLATES) * 4  # 2 shape names x 2 colour names
    assert set(zip(shape_ids.tolist(), colour_ids.tolist())) == set(PAIRS)
    for template in toy_world.HELD_OUT_TEMPLATES:
        assert template not in toy_world.TRAIN_TEMPLATES


def test_shipped_model_config(pipeline):
    assert pipeline.vae_scale_factor == 1
    assert pipeline.vae.config.scaling_factor == 1.0
    assert pipeline.unet.config.sample_size == toy_world.IMAGE_SIZE
    assert pipeline.text_encoder.config.eos_token_id == pipeline.tokenizer.eos_token_id == 1
    assert pipeline.scheduler.config.beta_schedule == toy_world.BETA_SCHEDULE
    assert pipeline.safety_checker is None


def test_shipped_vae_near_identity(pipeline):
    generator = torch.Generator().manual_seed(2)
    images, shapes, colours = toy_world.sample_pictures(64, generator)
    latents = toy_world.to_model_range(images)

    with torch.no_grad():
        decoded = pipeline.vae.decode(latents).sample
        encoded = pipeline.vae.encode(latents).latent_dist.mean

    assert (decoded - latents).pow(2).mean() < 0.005
    assert (encoded - latents).pow(2).mean() < 0.005
    shape_ids, colour_ids = classify((decoded / 2 + 0.5).clamp(0, 1))
    assert torch.equal(shape_ids, shapes)
    assert torch.equal(colour_ids, colours)


def test_shipped_model_samples_prompted_pairs(pipeline):
    prompts, seeds = [], []
    for shape_id, colour_id in PAIRS:
        prompts.append(toy_world.caption("a {colour} {shape}", COLOUR_NAMES[colour_id], SHAPE_NAMES[shape_id]))
        seeds.append(shape_id * 3 + colour_id)

    images = toy_world.generate(pipeline, prompts, seeds, steps=20)
    shape_ids, colour_ids = classify(images)

    assert images.shape == (len(PAIRS), 3, toy_world.IMAGE_SIZE, toy_world.IMAGE_SIZE)
    assert (shape_ids == torch.tensor([s for s, _ in PAIRS])).float().mean() >= MIN_SAMPLED_SHAPE_ACCURACY
    assert (colour_ids == torch.tensor([c for _, c in PAIRS])).float().mean() >= MIN_SAMPLED_COLOUR_ACCURACY


def test_shipped_encoder_pools_synonyms_closer(pipeline):
    similarities = toy_world.pooled_similarities(pipeline.text_encoder, pipeline.tokenizer)

    assert similarities["shape synonyms"] > similarities["different shapes"]
    assert similarities["colour synonyms"] > similarities["different colours"]
