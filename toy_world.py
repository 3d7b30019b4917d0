"""The toy world: a tiny text-to-image model of coloured shapes with an exact oracle.

Erasing a concept from Stable Diffusion is slow to train and hard to score, because no exact
classifier exists for what a generated picture shows. This file builds a world where both problems
go away:

1. Pictures are single coloured shapes on black, so every concept ("circle", "red") is countable.
2. The model is a miniature Stable Diffusion made of the same diffusers and transformers classes
   (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, AutoencoderKL, DDIMScheduler). The project
   loads it with `StableDiffusionPipeline.from_pretrained("toy_model")` like the real thing.
3. An oracle (`classify`) reads shape and colour back from any picture by template matching, so
   erasure is scored exactly.

Every shape and colour has two names (synonyms), so an erasure of "circle" can be tested on "disc".

Commands:
    python toy_world.py train --out toy_model --seed 0   # trains on CPU and writes the pipeline folder
    python toy_world.py check toy_model                 # samples every pair and prints oracle accuracy
"""

import argparse
import copy
import functools
import itertools
import json
import math
import string
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# ---------------------------------------------------------------------------------------------
# Step 1: the vocabulary of the world.
# ---------------------------------------------------------------------------------------------

# Canonical name -> the two interchangeable names a caption may use for it.
SHAPES = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "cross": ("cross", "plus"),
}
COLOURS = {
    "red": ("red", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
}

# Class ids used by the oracle and the training labels are positions in these tuples.
SHAPE_NAMES = tuple(SHAPES)
COLOUR_NAMES = tuple(COLOURS)

# RGB of each colour in [0, 1]. Pure primaries keep each colour in its own channel, so a colour
# stays readable even when the generated shape is blurred or faint.
PALETTE = torch.tensor(
    [
        [1.0, 0.0, 0.0],  # red
        [0.0, 1.0, 0.0],  # green
        [0.0, 0.0, 1.0],  # blue
    ]
)

# Caption templates. Training uses TRAIN_TEMPLATES only, so HELD_OUT_TEMPLATES tests whether the
# model generalises to a wording it never saw ("photo" gets no gradient in training).
TEMPLATES = (
    "{colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "a {shape} in {colour}",
    "a photo of a {colour} {shape}",
)
HELD_OUT_TEMPLATES = ("a photo of a {colour} {shape}",)
TRAIN_TEMPLATES = tuple(t for t in TEMPLATES if t not in HELD_OUT_TEMPLATES)

# Share of training captions replaced by "", so the UNet also learns the unconditional
# prediction that classifier-free guidance subtracts.
EMPTY_CAPTION_RATE = 0.1

IMAGE_SIZE = 16  # pixels per side; the VAE has scale factor 1, so latents are 16x16 too
MAX_TEXT_LENGTH = 16  # tokens per caption including BOS and EOS; the longest caption needs 8

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def caption(template, colour_name, shape_name):
    """Fill a caption template with one name of a colour and one name of a shape."""
    return template.format(colour=colour_name, shape=shape_name)


def toy_words():
    """Return every word that any caption can contain, so each becomes a single token."""
    words = set()
    for names in itertools.chain(SHAPES.values(), COLOURS.values()):
        words.update(names)
    for template in TEMPLATES:
        words.update(template.format(colour="", shape="").split())
    return sorted(words)


def build_tokenizer(words, model_max_length):
    """Build a CLIP byte-pair tokenizer in memory whose merges spell each word whole.

    Every lowercase letter is in the vocabulary, so any ASCII word still tokenizes (letter by letter);
    the listed words become single tokens through left-to-right merges, as in CLIP's own vocabulary.
    """
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for letter in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))

    merges = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = (merged, symbol)
            merged = merged + symbol
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))

    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tokenize(tokenizer, captions):
    """Tokenize captions exactly as StableDiffusionPipeline does: padded to the maximum length.

    The pipeline passes no attention mask, and CLIP's causal mask already keeps padding out of every
    position up to EOS, so training uses no mask either.
    """
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---------------------------------------------------------------------------------------------
# Step 2: rendering pictures.
# ---------------------------------------------------------------------------------------------

# A shape is set by its centre and its half extent (the circle's radius, half the square's side,
# half the cross's span). Both are multiples of GRID_STEP pixels, so the oracle can hold a template
# for every picture the renderer can draw, which makes it exact on clean renders.
GRID_STEP = 0.5
MIN_HALF_EXTENT = 3.0  # smaller crosses have arms under 2 pixels thick and stop reading as a cross
MAX_HALF_EXTENT = 6.5
EDGE_MARGIN = 0.5  # pixels kept clear between a shape and the picture's border

# Each pixel is the mean of SUPERSAMPLING x SUPERSAMPLING point samples, which anti-aliases edges.
SUPERSAMPLING = 4

# Half thickness of the cross's bars as a share of its half extent: one third makes the cross the
# five middle cells of a 3x3 grid, with arms as long as they are thick.
CROSS_BAR_SHARE = 1.0 / 3.0


def shape_coverage(shape_ids, centres, half_extents, size=IMAGE_SIZE):
    """Render the anti-aliased coverage mask of each shape.

    shape_ids: (N,) long; centres: (N, 2) as (x, y) in pixels from the top-left corner;
    half_extents: (N,) in pixels. Returns (N, size, size) floats in [0, 1].
    """
    # Point sample coordinates at the centres of the sub-pixels: (size * SUPERSAMPLING,)
    points = (torch.arange(size * SUPERSAMPLING, dtype=torch.float32) + 0.5) / SUPERSAMPLING
    dx = points.view(1, 1, -1) - centres[:, 0].view(-1, 1, 1)  # (N, 1, S)
    dy = points.view(1, -1, 1) - centres[:, 1].view(-1, 1, 1)  # (N, S, 1)
    h = half_extents.view(-1, 1, 1)
    ax, ay = dx.abs(), dy.abs()

    # Each mask: (N, S, S) booleans, S = size * SUPERSAMPLING.
    circle = dx**2 + dy**2 <= h**2
    square = (ax <= h) & (ay <= h)
    bar = CROSS_BAR_SHARE * h
    cross = ((ax <= bar) & (ay <= h)) | ((ay <= bar) & (ax <= h))

    masks = torch.stack([circle, square, cross], dim=1).float()  # (N, 3, S, S), order of SHAPE_NAMES
    chosen = masks[torch.arange(len(shape_ids)), shape_ids]  # (N, S, S)
    return F.avg_pool2d(chosen.unsqueeze(1), SUPERSAMPLING).squeeze(1)  # (N, size, size)


def render(shape_ids, colour_ids, centres, half_extents, size=IMAGE_SIZE):
    """Render shapes on black. Returns (N, 3, size, size) floats in [0, 1], like the pipeline's output."""
    coverage = shape_coverage(shape_ids, centres, half_extents, size)  # (N, H, W)
    colours = PALETTE[colour_ids]  # (N, 3)
    return coverage.unsqueeze(1) * colours.view(-1, 3, 1, 1)  # (N, 3, H, W)


def sample_layouts(n, generator, size=IMAGE_SIZE):
    """Draw n random sizes and positions on the grid. Returns centres (n, 2) and half extents (n,)."""
    steps = round((MAX_HALF_EXTENT - MIN_HALF_EXTENT) / GRID_STEP) + 1
    half_extents = MIN_HALF_EXTENT + GRID_STEP * torch.randint(steps, (n,), generator=generator)

    # Centres range over [h + margin, size - h - margin] in grid steps, a range that shrinks as h grows.
    lowest = half_extents + EDGE_MARGIN
    positions = ((size - 2 * lowest) / GRID_STEP).round().long() + 1  # (n,) choices per axis
    offsets = (torch.rand(n, 2, generator=generator) * positions.unsqueeze(1)).floor()
    centres = lowest.unsqueeze(1) + GRID_STEP * offsets  # (n, 2)
    return centres, half_extents


def sample_pictures(n, generator, size=IMAGE_SIZE):
    """Draw n random pictures. Returns images (n, 3, H, W) in [0, 1], shape ids and colour ids."""
    shape_ids = torch.randint(len(SHAPE_NAMES), (n,), generator=generator)
    colour_ids = torch.randint(len(COLOUR_NAMES), (n,), generator=generator)
    centres, half_extents = sample_layouts(n, generator, size)
    return render(shape_ids, colour_ids, centres, half_extents, size), shape_ids, colour_ids


# ---------------------------------------------------------------------------------------------
# Step 3: the oracle.
# ---------------------------------------------------------------------------------------------

# Intensity below this is treated as background in both the picture and the templates. Generated
# pictures have faint haze on the black background that would otherwise blur every match.
BACKGROUND_FLOOR = 0.1

# A picture with less foreground than this (in pixels of full intensity) is empty. The
# smallest shape the renderer draws, a cross of half extent 3, covers 20 pixels.
MIN_FOREGROUND = 4.0

# Below this cosine similarity to the best template of any shape, the picture contains no
# recognisable shape. A clean render scores 1 for its shape, and 0.92 on average (0.96 at most, over
# 3000 renders) for the best wrong shape.
# NOTE: 0.75 and MIN_COLOUR_MATCH are judgement calls, not calibrated on blobs or erased outputs.
MIN_SHAPE_MATCH = 0.75

# Below this cosine similarity between the picture's mean foreground colour and the nearest palette
# colour, the colour is not recognisable (an even mix of two primaries scores 0.71).
MIN_COLOUR_MATCH = 0.85

UNRECOGNISED = -1  # class id returned when a picture contains no recognisable shape or colour


@functools.lru_cache(maxsize=4)
def shape_templates(size=IMAGE_SIZE):
    """Render every shape at every grid position and size the renderer can draw.

    Returns the unit-norm floored coverage masks (T, size * size) and the shape id of each (T,).
    """
    shape_ids, centres, half_extents = [], [], []
    steps = round((MAX_HALF_EXTENT - MIN_HALF_EXTENT) / GRID_STEP) + 1
    for i in range(steps):
        h = MIN_HALF_EXTENT + GRID_STEP * i
        lowest = h + EDGE_MARGIN
        positions = round((size - 2 * lowest) / GRID_STEP) + 1
        coordinates = [lowest + GRID_STEP * k for k in range(positions)]
        for shape_id in range(len(SHAPE_NAMES)):
            for x, y in itertools.product(coordinates, coordinates):
                shape_ids.append(shape_id)
                centres.append((x, y))
                half_extents.append(h)

    coverage = shape_coverage(torch.tensor(shape_ids), torch.tensor(centres), torch.tensor(half_extents), size)
    foreground = (coverage - BACKGROUND_FLOOR).clamp(min=0).flatten(1)  # (T, size * size)
    return F.normalize(foreground, dim=1), torch.tensor(shape_ids)


def match_shapes(images):
    """Score each picture against each shape. Returns (N, number of shapes) cosine similarities.

    A shape's score is the best cosine similarity between the picture's foreground intensity and any
    template of that shape, so position and size do not matter.
    """
    templates, template_shapes = shape_templates(images.shape[-1])
    intensity = images.amax(dim=1)  # (N, H, W): on black, the brightest channel is the coverage
    foreground = (intensity - BACKGROUND_FLOOR).clamp(min=0).flatten(1)  # (N, H * W)
    similarity = F.normalize(foreground, dim=1) @ templates.T  # (N, T)

    scores = torch.full((len(images), len(SHAPE_NAMES)), -1.0)
    for shape_id in range(len(SHAPE_NAMES)):
        scores[:, shape_id] = similarity[:, template_shapes == shape_id].amax(dim=1)
    return scores


def match_colours(images):
    """Score each picture's mean foreground colour against the palette. Returns (N, colours) cosines."""
    weights = images.amax(dim=1, keepdim=True)  # (N, 1, H, W), brighter pixels count more
    mean_colour = (images * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1e-8)  # (N, 3)
    return F.normalize(mean_colour, dim=1) @ F.normalize(PALETTE, dim=1).T  # (N, colours)


@torch.no_grad()
def classify(images):
    """Read the shape and colour of each picture.

    images: (N, 3, H, W) floats in [0, 1], as `pipeline(..., output_type="pt").images` returns.
    Returns (shape_ids, colour_ids), each (N,) long, indexing SHAPE_NAMES and COLOUR_NAMES, with
    UNRECOGNISED (-1) where the picture is empty or matches no shape or colour well enough.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    shape_scores = match_shapes(images)
    colour_scores = match_colours(images)
    best_shape_score, shape_ids = shape_scores.max(dim=1)
    best_colour_score, colour_ids = colour_scores.max(dim=1)

    foreground = (images.amax(dim=1) - BACKGROUND_FLOOR).clamp(min=0).sum(dim=(1, 2))  # (N,)
    empty = foreground < MIN_FOREGROUND
    shape_ids[empty | (best_shape_score < MIN_SHAPE_MATCH)] = UNRECOGNISED
    colour_ids[empty | (best_colour_score < MIN_COLOUR_MATCH)] = UNRECOGNISED
    return shape_ids, colour_ids


# ---------------------------------------------------------------------------------------------
# Step 4: the model, built from the classes of Stable Diffusion at toy size.
# ---------------------------------------------------------------------------------------------

TEXT_HIDDEN_SIZE = 64

# The training schedule. The DDIM sampler must use the same betas, so both read these.
NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # cosine schedule, which ends at almost zero signal (see build_scheduler)
PREDICTION_TYPE = "v_prediction"  # the UNet's target; see build_scheduler for why not epsilon


def build_text_encoder(vocab_size):
    """Build a small CLIP text encoder.

    BOS 0 and EOS 1 match `build_tokenizer`. With eos_token_id != 2, transformers takes
    `pooler_output` at the first EOS token, as real CLIP does.
    """
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_unet():
    """Build a small cross-attention UNet (about 1.7M parameters) that works on 16x16 pixels.

    Attention runs at 8x8 and 4x4; the first block is plain convolution because attention over all
    256 pixels costs the most and shapes at 16x16 need little global context at full resolution.
    """
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_vae():
    """Build an autoencoder with one block, so `vae_scale_factor` is 1 and latents are pixels.

    Trained to be the identity, it lets the UNet work in pixel space while the pipeline still
    decodes latents through a VAE exactly as it does for Stable Diffusion.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )


def build_scheduler():
    """Build the DDIM sampler over the training noise schedule.

    The cosine schedule ends at a signal rate of 5e-5 (alphas_cumprod[999] is 2.4e-9), so sampling
    starts from pure noise at t = 999 ("trailing" spacing). There, x0 = (x_t - eps) / 5e-5 turns any
    error of an epsilon prediction into garbage, so the UNet predicts v instead, which tends to -x0
    as noise takes over (Stable Diffusion 2 also predicts v). In trials, epsilon prediction gave
    speckled samples, and collapsed ones with "trailing" spacing.

    The predicted x0 is not clipped. DDIM in diffusers 0.42 clips x0 but keeps the unclipped
    epsilon, and in trials clipping made samples noisy and often ignore the prompt's colour.
    """
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        prediction_type=PREDICTION_TYPE,
        timestep_spacing="trailing",
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """Put the parts together as a StableDiffusionPipeline without a safety checker."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------------------------------------
# Step 5: sampling and scoring, used both during training and by `check`.
# ---------------------------------------------------------------------------------------------

# Sampling settings for the shipped toy model, with which `check` measured 100% shape and colour
# accuracy. Guidance also enlarges shapes: at 4, generated shapes cover 125 pixels on average
# against 68 in the training data (at 1, 74).
TOY_STEPS = 25
TOY_GUIDANCE_SCALE = 4.0

# Prompts per pipeline call. Guidance doubles the UNet batch, and on CPU a UNet batch of 720 ran
# about 3 times slower per picture than one of 128.
SAMPLING_BATCH = 64


def prompt_table(templates, seeds):
    """List every (prompt, shape id, colour id, template, seed) over all pairs, synonyms and seeds."""
    rows = []
    for shape_id, shape in enumerate(SHAPE_NAMES):
        for colour_id, colour in enumerate(COLOUR_NAMES):
            for template in templates:
                for shape_name, colour_name in itertools.product(SHAPES[shape], COLOURS[colour]):
                    for seed in seeds:
                        prompt = caption(template, colour_name, shape_name)
                        rows.append((prompt, shape_id, colour_id, template, seed))
    return rows


@torch.no_grad()
def generate(pipeline, prompts, seeds, steps=TOY_STEPS, guidance_scale=TOY_GUIDANCE_SCALE):
    """Sample one picture per prompt, each from its own seed. Returns (N, 3, H, W) in [0, 1]."""
    images = []
    for start in range(0, len(prompts), SAMPLING_BATCH):
        batch_prompts = prompts[start : start + SAMPLING_BATCH]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + SAMPLING_BATCH]]
        output = pipeline(
            batch_prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        )
        images.append(output.images.cpu())
    return torch.cat(images)


def score_rows(rows, images):
    """Classify generated pictures and compare with the prompts. Returns per-row correctness."""
    shape_ids, colour_ids = classify(images)
    shape_correct = shape_ids == torch.tensor([row[1] for row in rows])
    colour_correct = colour_ids == torch.tensor([row[2] for row in rows])
    return shape_correct, colour_correct


# ---------------------------------------------------------------------------------------------
# Step 6: training.
# ---------------------------------------------------------------------------------------------

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WARMUP_STEPS = 200
WEIGHT_DECAY = 0.01
EMA_DECAY = 0.999  # averages over about the last 1000 steps

# Weight of the cross-entropy that makes `pooler_output` predict the caption's shape and colour.
# Real CLIP's pooled embedding is trained to match images, so synonyms land close together. The
# erasure hypernetwork reads this embedding, so the toy encoder needs the same property. At 0.1 the
# weighted term starts at about a fifth of the diffusion loss and is under 1e-3 after 600 steps.
POOLED_CLASS_LOSS_WEIGHT = 0.1

VAE_STEPS = 800
VAE_LEARNING_RATE = 2e-3
# The decoder must pass on whatever the UNet produces, not only clean renders, so the autoencoder
# also trains on renders with Gaussian noise of up to this standard deviation (in [-1, 1] units).
VAE_MAX_NOISE = 0.3

EVAL_SEEDS = (1000,)  # sampling seed for the periodic oracle score, apart from the check seeds
EVAL_STEPS = 15  # fewer DDIM steps than TOY_STEPS keep the periodic score cheap


def to_model_range(images):
    """Map pictures from [0, 1] to [-1, 1], the range the VAE decoder outputs and latents use."""
    return images * 2 - 1


def train_vae(vae, generator, steps, log):
    """Train the autoencoder to be the identity on pictures: decode(x) = x and encode(x).mean = x."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LEARNING_RATE)
    progress = tqdm(range(steps), desc="vae", mininterval=5)
    for step in progress:
        images, _, _ = sample_pictures(BATCH_SIZE, generator)
        clean = to_model_range(images)  # (B, 3, H, W)
        noise_scale = VAE_MAX_NOISE * torch.rand(BATCH_SIZE, 1, 1, 1, generator=generator)
        x = clean + noise_scale * torch.randn(clean.shape, generator=generator)

        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(x).sample, x) + F.mse_loss(posterior.mean, x)
        # Keep encode(x) nearly deterministic: push the log variance towards -10 (std under 0.01).
        loss = loss + 1e-3 * F.mse_loss(posterior.logvar, torch.full_like(posterior.logvar, -10.0))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.5f}")
            log(f"vae step {step} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)


def caption_table(tokenizer):
    """Tokenize every training caption once. Returns token ids (C, L), shape ids (C,), colour ids (C,)."""
    captions, shape_ids, colour_ids = [], [], []
    for shape_id, shape in enumerate(SHAPE_NAMES):
        for colour_id, colour in enumerate(COLOUR_NAMES):
            for template in TRAIN_TEMPLATES:
                for shape_name, colour_name in itertools.product(SHAPES[shape], COLOURS[colour]):
                    captions.append(caption(template, colour_name, shape_name))
                    shape_ids.append(shape_id)
                    colour_ids.append(colour_id)
    return tokenize(tokenizer, captions), torch.tensor(shape_ids), torch.tensor(colour_ids)


def training_batch(table, empty_ids, generator):
    """Draw a batch of pictures with matching captions, some replaced by the empty caption.

    Returns latents (B, 3, H, W) in [-1, 1], token ids (B, L), shape ids, colour ids and a mask
    (B,) that is True where the caption was kept.
    """
    token_table, table_shapes, table_colours = table
    rows = torch.randint(len(token_table), (BATCH_SIZE,), generator=generator)
    shape_ids, colour_ids = table_shapes[rows], table_colours[rows]
    centres, half_extents = sample_layouts(BATCH_SIZE, generator)
    latents = to_model_range(render(shape_ids, colour_ids, centres, half_extents))

    keep = torch.rand(BATCH_SIZE, generator=generator) >= EMPTY_CAPTION_RATE
    token_ids = torch.where(keep.unsqueeze(1), token_table[rows], empty_ids)
    return latents, token_ids, shape_ids, colour_ids, keep


def update_ema(ema_model, model, decay):
    """Move each EMA parameter a step of (1 - decay) towards the trained one."""
    with torch.no_grad():
        for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
            ema_parameter.lerp_(parameter, 1 - decay)


def evaluate(pipeline):
    """Score a pipeline with the oracle on every pair, training template and synonym, one seed.

    Returns (shape accuracy, colour accuracy) in [0, 1].
    """
    rows = prompt_table(TRAIN_TEMPLATES, EVAL_SEEDS)
    images = generate(pipeline, [r[0] for r in rows], [r[4] for r in rows], steps=EVAL_STEPS)
    shape_correct, colour_correct = score_rows(rows, images)
    return shape_correct.float().mean().item(), colour_correct.float().mean().item()


def training_losses(unet, text_encoder, class_head, alphas_cumprod, batch, generator):
    """Compute the diffusion loss and the pooled class loss on one batch from `training_batch`."""
    latents, token_ids, shape_ids, colour_ids, keep = batch

    # Forward diffusion x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and the velocity target
    # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, all (B, 3, H, W).
    timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents

    encoded = text_encoder(token_ids)
    prediction = unet(noisy, timesteps, encoder_hidden_states=encoded.last_hidden_state).sample
    diffusion_loss = F.mse_loss(prediction, velocity)

    # Empty captions name no class, so only kept captions train the head.
    logits = class_head(encoded.pooler_output[keep])  # (kept, shapes + colours)
    shape_loss = F.cross_entropy(logits[:, : len(SHAPE_NAMES)], shape_ids[keep])
    colour_loss = F.cross_entropy(logits[:, len(SHAPE_NAMES) :], colour_ids[keep])
    return diffusion_loss, shape_loss + colour_loss


def learning_rate_factor(step, schedule_steps):
    """Linear warm-up, then cosine decay to a tenth of the peak at schedule_steps."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, schedule_steps - WARMUP_STEPS))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(args):
    """Train the VAE, then the text encoder and UNet jointly, and save the best EMA snapshot."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats made VAE training about 6 times slower on CPU
    torch.manual_seed(args.seed)  # model initialisation
    generator = torch.Generator().manual_seed(args.seed)  # data, timesteps and noise
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(message):
        tqdm.write(message)
        log_file.write(message + "\n")
        log_file.flush()

    started = time.monotonic()
    log(f"training toy model: {vars(args)}")

    tokenizer = build_tokenizer(toy_words(), MAX_TEXT_LENGTH)
    vae = build_vae()
    text_encoder = build_text_encoder(len(tokenizer))
    unet = build_unet()
    scheduler = build_scheduler()
    log(
        f"parameters: unet {sum(p.numel() for p in unet.parameters()):,}, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,}, "
        f"vae {sum(p.numel() for p in vae.parameters()):,}"
    )

    train_vae(vae, generator, args.vae_steps, log)

    # A linear head on pooler_output that predicts shape and colour; only its gradient matters,
    # so it is not saved.
    class_head = torch.nn.Linear(TEXT_HIDDEN_SIZE, len(SHAPE_NAMES) + len(COLOUR_NAMES))

    trained = list(unet.parameters()) + list(text_encoder.parameters()) + list(class_head.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.schedule_steps))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text_encoder = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pipeline = assemble_pipeline(vae, ema_text_encoder, tokenizer, ema_unet)

    table = caption_table(tokenizer)
    empty_ids = tokenize(tokenizer, [""])  # (1, L)
    alphas_cumprod = scheduler.alphas_cumprod  # (T,)

    best_score, best_step = -1.0, None
    running = {"diffusion": 0.0, "class": 0.0}
    progress = tqdm(range(args.max_steps), desc="train", mininterval=10)
    for step in progress:
        batch = training_batch(table, empty_ids, generator)
        diffusion_loss, class_loss = training_losses(unet, text_encoder, class_head, alphas_cumprod, batch, generator)
        loss = diffusion_loss + POOLED_CLASS_LOSS_WEIGHT * class_loss

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()

        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short memory at first, when weights move fast
        update_ema(ema_unet, unet, decay)
        update_ema(ema_text_encoder, text_encoder, decay)

        running["diffusion"] += diffusion_loss.item()
        running["class"] += class_loss.item()
        last_step = step == args.max_steps - 1
        out_of_time = args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes
        if (step + 1) % args.eval_interval == 0 or last_step or out_of_time:
            count = (step % args.eval_interval) + 1
            shape_accuracy, colour_accuracy = evaluate(ema_pipeline)
            score = shape_accuracy + colour_accuracy
            entry = {
                "step": step + 1,
                "minutes": round((time.monotonic() - started) / 60, 2),
                "diffusion_loss": round(running["diffusion"] / count, 5),
                "class_loss": round(running["class"] / count, 5),
                "shape_accuracy": round(shape_accuracy, 4),
                "colour_accuracy": round(colour_accuracy, 4),
            }
            running = {"diffusion": 0.0, "class": 0.0}
            if score >= best_score:  # a tie goes to the later snapshot, which has trained longer
                best_score, best_step = score, step + 1
                ema_pipeline.save_pretrained(out)
                entry["saved"] = True
            log(json.dumps(entry))
        if out_of_time:
            log(f"stopping at step {step + 1}: the --max-minutes budget of {args.max_minutes} ran out")
            break

    log(f"saved the EMA snapshot of step {best_step} to {out} after {(time.monotonic() - started) / 60:.1f} minutes")
    log_file.close()


# ---------------------------------------------------------------------------------------------
# Step 7: checking a saved model.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_similarities(text_encoder, tokenizer):
    """Measure how close `pooler_output` puts synonyms compared with different concepts.

    Compares captions that differ only in the shape word (or only in the colour word). Returns the
    mean cosine similarity of pooled embeddings for four kinds of pair: "shape synonyms" (circle vs
    disc), "different shapes" (circle vs box), "colour synonyms" and "different colours".
    """
    pairs = {"shape synonyms": [], "different shapes": [], "colour synonyms": [], "different colours": []}
    shape_words = [(shape_id, name) for shape_id, shape in enumerate(SHAPE_NAMES) for name in SHAPES[shape]]
    colour_words = [(colour_id, name) for colour_id, colour in enumerate(COLOUR_NAMES) for name in COLOURS[colour]]

    for template in TEMPLATES:
        for _, colour_name in colour_words:
            prompts = [caption(template, colour_name, name) for _, name in shape_words]
            _add_pair_similarities(text_encoder, tokenizer, prompts, [i for i, _ in shape_words], pairs, "shape")
        for _, shape_name in shape_words:
            prompts = [caption(template, name, shape_name) for _, name in colour_words]
            _add_pair_similarities(text_encoder, tokenizer, prompts, [i for i, _ in colour_words], pairs, "colour")
    return {kind: sum(values) / len(values) for kind, values in pairs.items()}


def _add_pair_similarities(text_encoder, tokenizer, prompts, class_ids, pairs, kind):
    """Append the pooled cosine similarity of every pair of prompts to the synonym or different list."""
    pooled = F.normalize(text_encoder(tokenize(tokenizer, prompts)).pooler_output, dim=1)  # (P, hidden)
    cosine = pooled @ pooled.T  # (P, P)
    for i, j in itertools.combinations(range(len(prompts)), 2):
        key = f"{kind} synonyms" if class_ids[i] == class_ids[j] else f"different {kind}s"
        pairs[key].append(cosine[i, j].item())


def check(args):
    """Sample every pair with every template, synonym and seed, and print the oracle's accuracy."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pipeline = StableDiffusionPipeline.from_pretrained(args.folder)
    pipeline.set_progress_bar_config(disable=True)

    seeds = tuple(range(args.seeds))
    rows = prompt_table(TEMPLATES, seeds)
    started = time.monotonic()
    images = generate(pipeline, [r[0] for r in rows], [r[4] for r in rows], args.steps, args.guidance_scale)
    shape_correct, colour_correct = score_rows(rows, images)
    print(
        f"{len(rows)} samples ({args.steps} DDIM steps, guidance {args.guidance_scale}) "
        f"in {time.monotonic() - started:.0f} s"
    )

    print(f"\n{'pair':<16}{'shape':>8}{'colour':>8}")
    for shape_id, colour_id in itertools.product(range(len(SHAPE_NAMES)), range(len(COLOUR_NAMES))):
        selected = torch.tensor([r[1] == shape_id and r[2] == colour_id for r in rows])
        pair = f"{COLOUR_NAMES[colour_id]} {SHAPE_NAMES[shape_id]}"
        print(
            f"{pair:<16}{shape_correct[selected].float().mean():>8.1%}{colour_correct[selected].float().mean():>8.1%}"
        )

    print(f"\n{'template':<42}{'shape':>8}{'colour':>8}")
    for template in TEMPLATES:
        selected = torch.tensor([r[3] == template for r in rows])
        label = template + (" (held out)" if template in HELD_OUT_TEMPLATES else "")
        print(
            f"{label:<42}{shape_correct[selected].float().mean():>8.1%}{colour_correct[selected].float().mean():>8.1%}"
        )

    trained = torch.tensor([r[3] in TRAIN_TEMPLATES for r in rows])
    print(
        f"\noverall: shape {shape_correct.float().mean():.1%}, colour {colour_correct.float().mean():.1%} "
        f"(training templates only: shape {shape_correct[trained].float().mean():.1%}, "
        f"colour {colour_correct[trained].float().mean():.1%})"
    )

    similarities = pooled_similarities(pipeline.text_encoder, pipeline.tokenizer)
    print("pooled embedding cosine similarity: " + ", ".join(f"{k} {v:.3f}" for k, v in similarities.items()))

    if args.grid:
        save_grid(images, args.grid)
        print(f"wrote {len(images)} samples to {args.grid}")


def save_grid(images, path, columns=36, zoom=4):
    """Save pictures (N, 3, H, W) in [0, 1] as one PNG grid, each enlarged zoom times."""
    from PIL import Image

    n, _, height, width = images.shape
    rows = math.ceil(n / columns)
    grid = torch.full((3, rows * (height + 1) + 1, columns * (width + 1) + 1), 0.5)  # grey separators
    for i, image in enumerate(images):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = image
    pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    picture = Image.fromarray(pixels)
    picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


# One thread by default. On a 2-core machine shared with other jobs, two OpenMP threads made a training
# step 5 to 20 times slower than one, because the threads wait on each other. On an idle machine, two
# threads were only about twice as fast as one.
THREADS_HELP = "torch CPU threads; raise it only on a machine with idle cores (default: 1)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train the toy model on CPU and save it as a pipeline folder")
    train_parser.add_argument("--out", default="toy_model", help="folder to write the pipeline to (default: toy_model)")
    train_parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, data and noise (default: 0)")
    train_parser.add_argument(
        "--max-steps",
        type=int,
        default=1800,
        help="training steps of the UNet and text encoder; the shipped model is the snapshot of step 1800 (default: 1800)",
    )
    train_parser.add_argument(
        "--schedule-steps",
        type=int,
        default=2400,
        help="length of the cosine learning-rate decay, independent of where training stops, so a shorter "
        "run follows the same schedule as a longer one (default: 2400)",
    )
    train_parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after this many minutes of wall time even before --max-steps; "
        "the result then depends on machine speed (default: no limit)",
    )
    train_parser.add_argument(
        "--vae-steps",
        type=int,
        default=VAE_STEPS,
        help=f"training steps of the identity autoencoder (default: {VAE_STEPS})",
    )
    train_parser.add_argument(
        "--lr", type=float, default=LEARNING_RATE, help=f"peak AdamW learning rate (default: {LEARNING_RATE})"
    )
    train_parser.add_argument(
        "--eval-interval", type=int, default=300, help="steps between oracle scores of the EMA model (default: 300)"
    )
    train_parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)

    check_parser = commands.add_parser("check", help="sample every shape-colour pair and print the oracle's accuracy")
    check_parser.add_argument("folder", help="pipeline folder to load, e.g. toy_model")
    check_parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt, 0 to N-1 (default: 2)")
    check_parser.add_argument("--steps", type=int, default=TOY_STEPS, help=f"DDIM steps (default: {TOY_STEPS})")
    check_parser.add_argument(
        "--guidance-scale",
        type=float,
        default=TOY_GUIDANCE_SCALE,
        help=f"classifier-free guidance scale (default: {TOY_GUIDANCE_SCALE})",
    )
    check_parser.add_argument("--grid", default=None, help="also save all samples to this PNG file")
    check_parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        check(args)


if __name__ == "__main__":
    main()
