"""Build tiny, randomly initialised Stable Diffusion and FLUX.1-dev pipelines on disk.

Each builder makes the real diffusers and transformers classes from small configs and writes them with
`save_pretrained`, so tests load them through the same `from_pretrained` path a downloaded model takes.
The weights are random: the images mean nothing, but every shape, config field and code path is real.
"""

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from toy_world import build_tokenizer

DEFAULT_WORDS = (
    "a", "an", "the", "of", "on", "and", "photo", "picture", "painting",
    "red", "green", "blue", "yellow", "black", "white",
    "circle", "square", "triangle", "star", "shape",
)  # fmt: skip

# Both text encoders and the CLIP tokenizer share this context length. CLIP's real one is 77.
MAX_TOKENS = 16
CLIP_HIDDEN_SIZE = 16
T5_HIDDEN_SIZE = 32


def make_tiny_sd(path, seed=0, sd2_like=False, words=DEFAULT_WORDS):
    """Write a tiny `StableDiffusionPipeline` folder to `path` and return the pipeline.

    The UNet has one cross-attention down block, a cross-attention mid block and one cross-attention up
    block, so it contains both `attn1` (self-attention) and `attn2` (cross-attention) layers. The VAE
    downsamples by 2 and the UNet sample size is 8, so the default image is 16x16 pixels.

    With `sd2_like=True` the UNet uses linear projections and a per-block head count, the text encoder uses
    GELU, and the scheduler predicts v, as stable-diffusion-2 (768-v) does. Otherwise the settings follow
    Stable Diffusion 1.x.
    """
    tokenizer = build_tokenizer(words, model_max_length=MAX_TOKENS)

    # fork_rng keeps the caller's global random state unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CLIP_HIDDEN_SIZE,
            # In UNet2DConditionModel `attention_head_dim` sets the number of heads, a known misnomer.
            attention_head_dim=(2, 4) if sd2_like else 2,
            use_linear_projection=sd2_like,
            norm_num_groups=4,
        )

        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), hidden_act="gelu" if sd2_like else "quick_gelu"))

        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        )

    # Stable Diffusion 1.x and 2.x scheduler settings, as diffusers 0.42 sets them when it loads an SD
    # checkpoint file (loaders/single_file_utils.py).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2_like else "epsilon",
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def make_tiny_flux(path, seed=0, words=DEFAULT_WORDS):
    """Write a tiny `FluxPipeline` folder shaped like FLUX.1-dev to `path` and return the pipeline.

    Like FLUX.1-dev, the transformer embeds the guidance scale (so there is no classifier-free guidance
    batch), the VAE has 16 latent channels with a shift and scale factor, and the scheduler shifts its
    sigmas by image size. The VAE downsamples by 2 and the pipeline packs 2x2 latent patches, so height and
    width must be multiples of 4 pixels. The pipeline's default size is 256x256, so pass a smaller one.
    """
    clip_tokenizer = build_tokenizer(words, model_max_length=MAX_TOKENS)
    t5_tokenizer = _build_t5_tokenizer(words)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            # FluxPipeline packs each 2x2 patch of the 16-channel latent into one token of 64 channels.
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=T5_HIDDEN_SIZE,
            pooled_projection_dim=CLIP_HIDDEN_SIZE,
            guidance_embeds=True,
            # The three rotary axes must sum to attention_head_dim, and each must be even.
            axes_dims_rope=(2, 2, 4),
        )

        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(_clip_text_config(len(clip_tokenizer), hidden_act="quick_gelu"))

        torch.manual_seed(seed + 2)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=T5_HIDDEN_SIZE,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                # T5 v1.1, the encoder FLUX.1 uses, has a gated GELU feed-forward.
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )

        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            # FLUX.1-dev's VAE factors, as listed in diffusers 0.42 utils/remote_utils.py.
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    # FLUX.1-dev's scheduler settings. FluxPipeline reads the four sequence-length and shift settings to
    # compute `mu`, the resolution-dependent shift that use_dynamic_shifting applies.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return pipe


def _clip_text_config(vocab_size, hidden_act):
    # Token ids 0 and 1 are the start and end tokens of toy_world.build_tokenizer, which pads with the end token.
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _build_t5_tokenizer(words):
    """Build a T5 Unigram tokenizer in memory that spells each word whole and any other word by characters.

    The first three ids follow T5, so <pad> is 0, </s> is 1 and <unk> is 2. Whole words score higher than
    their characters, so the Unigram model picks the whole word when it can.
    """
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    for word in sorted(set(words)):
        scores["\u2581" + word] = -1.0
    for character in string.ascii_lowercase + string.digits + string.punctuation:
        scores.setdefault(character, -5.0)
        scores.setdefault("\u2581" + character, -5.0)
    vocab = list(scores.items())

    # extra_ids=0 leaves out the 100 sentinel tokens, which only T5's span-corruption pretraining uses.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TOKENS)


def make_tiny_clip(path, seed=0, words=DEFAULT_WORDS, image_size=32):
    """Write a tiny `CLIPModel` with its `CLIPProcessor` to `path` and return (model, processor).

    The folder loads with `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` like a downloaded
    CLIP. The vision tower takes square images of `image_size` pixels in 8x8 patches, and the processor
    resizes any image to that size.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tokenizer(words, model_max_length=MAX_TOKENS)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        text_config=_clip_text_config(len(tokenizer), hidden_act="quick_gelu").to_dict(),
        vision_config={
            "hidden_size": CLIP_HIDDEN_SIZE,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)

    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor
