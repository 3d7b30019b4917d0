"""Train a hypernetwork that erases concepts from FLUX.1 [dev].

    python train_flux.py --concept "nudity" --anchor "a fully dressed person"        # FLUX.1-dev from the Hub
    python train_flux.py --concept "van gogh" --target attn --gradient-checkpointing
    python train_flux.py --model /models/FLUX.1-dev --concept "tom cruise" --anchor "a man" --resume ckpt.pt

    # A CPU smoke run on a tiny random model shaped like FLUX.1-dev (its images mean nothing):
    PYTHONPATH=tests python -c "from tiny_models import make_tiny_flux; make_tiny_flux('tiny_flux')"
    python train_flux.py --model tiny_flux --concept circle --resolution 16 --max-sequence-length 8 --steps 20

The transformer stays frozen. Its attention layers get LoRA adapters whose factors the hypernetwork
writes from the prompt's pooled CLIP embedding. Flux is a flow-matching model: it predicts the velocity
v = noise - x_0 instead of the noise eps. At a fixed x_t and sigma, v = (eps - x_t) / (1 - sigma) is an
affine function of eps, so ESD's negative guidance keeps its meaning on velocities: on an erase prompt
the LoRA-equipped transformer learns to predict v_a - eta * (v_p - v_a), while on retain prompts the
generated LoRA stays at zero.

x_t comes from FluxPipeline's own sampler: Euler steps over the sigma schedule shifted for the image
size, stopped at a random step. FLUX.1 [dev] takes its distilled guidance value (--guidance) as an
input, so there is no classifier-free guidance batch.

Memory: the T5 and CLIP prompt embeddings are computed once, after which the text encoders and the VAE
are freed. One transformer serves both the frozen predictions (LoRA cleared) and the trained ones.
--gradient-checkpointing recomputes the transformer's block activations in the backward pass.

NOTE: estimated, not measured on a GPU, for FLUX.1-dev at 512 px in bf16 with target `vo`: 22 GiB of
transformer weights, plus about 8 GiB of saved activations per prompt in a forward pass with gradients,
or about 0.7 GiB with --gradient-checkpointing. With checkpointing the peak is about 32 GiB, while the
text encoders are loaded; without it, a training step at batch 2 peaks near 40 GiB.
"""

import argparse
import gc

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

import common
import trainer
from lora_inject import TARGET_SETS, inject_lora

# FluxPipeline (diffusers 0.42) rejects a T5 context longer than 512 tokens.
MAX_T5_TOKENS = 512
# Prompts encoded per call of the text encoders, which bounds their activation memory.
ENCODE_BATCH_SIZE = 16


def parse_args():
    # conflict_handler="resolve" lets --dtype below replace the shared option, whose CUDA default is fp16.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    trainer.add_training_arguments(
        parser,
        default_model="black-forest-labs/FLUX.1-dev",
        default_target="vo",
        targets=list(TARGET_SETS["flux"]),
        default_hidden_dim=100,
    )
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                        help="model dtype (default: bf16 on CUDA, the dtype the diffusers Flux documentation "
                             "loads FLUX.1 in; fp32 on CPU)")
    parser.add_argument("--guidance", type=float, default=3.5,
                        help="value fed to FLUX.1 [dev]'s guidance embedding in every prediction, as in "
                             "FluxPipeline's guidance_scale: distilled guidance, not classifier-free guidance "
                             "(default: 3.5)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="side of the square images whose latents x_t are sampled, in pixels "
                             "(default: 512, and a multiple of 16 for FLUX.1)")
    parser.add_argument("--sampling-steps", type=int, default=28,
                        help="Euler steps of the sampler that produces x_t, which training stops at a random "
                             "step (default: 28, as sample.py uses for Flux)")
    parser.add_argument("--max-sequence-length", type=int, default=MAX_T5_TOKENS,
                        help=f"T5 tokens per prompt, at most and by default {MAX_T5_TOKENS}: shorter prompts "
                             "are padded, longer ones truncated")
    args = trainer.parse_args_with_presets(parser, {})
    trainer.validate_args(args)
    validate_flux_args(args)
    return args


def validate_flux_args(args):
    """Reject invalid Flux settings with one line each. The model's VAE checks --resolution later."""
    for name in ("resolution", "sampling_steps", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_sequence_length > MAX_T5_TOKENS:
        raise common.UserError(f"--max-sequence-length must be at most {MAX_T5_TOKENS}, got {args.max_sequence_length}")
    if not np.isfinite(args.guidance):
        raise common.UserError(f"invalid --guidance {args.guidance}: give a finite number such as 3.5")


@torch.no_grad()
def encode_prompts(pipe, prompts, max_sequence_length, device):
    """Encode prompts with both text encoders, as FluxPipeline does.

    Returns {"prompt_embeds": (n, max_sequence_length, T5 width), the T5 sequence the transformer
    attends to, "pooled_prompt_embeds": (n, CLIP width), CLIP's pooled output, which the transformer's
    modulation and the hypernetwork read}.
    """
    all_embeds, all_pooled = [], []
    for start in range(0, len(prompts), ENCODE_BATCH_SIZE):
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=list(prompts[start:start + ENCODE_BATCH_SIZE]),
            prompt_2=None,  # T5 reads the same prompt as CLIP
            device=device,
            max_sequence_length=max_sequence_length,
        )
        all_embeds.append(prompt_embeds)
        all_pooled.append(pooled_prompt_embeds)
    return {"prompt_embeds": torch.cat(all_embeds), "pooled_prompt_embeds": torch.cat(all_pooled)}


class FluxDenoiser:
    """The transformer's velocity prediction and FluxPipeline's way of drawing x_t, for the shared trainer.

    Latents stay packed as FluxPipeline packs them: each 2x2 patch of the 16-channel VAE latent is one
    token of 64 channels, so x_t is (batch, image tokens, 64) throughout.
    """

    def __init__(self, pipe, resolution, sampling_steps, guidance, max_sequence_length, device):
        self.transformer = pipe.transformer
        self.num_channels_latents = self.transformer.config.in_channels // 4

        # FluxPipeline.prepare_latents: the VAE downsamples by vae_scale_factor, and packing needs an even
        # latent side, so the image side must be a multiple of 2 * vae_scale_factor (16 for FLUX.1).
        multiple = 2 * pipe.vae_scale_factor
        if resolution % multiple:
            raise common.UserError(f"--resolution must be a multiple of {multiple} for this model, got {resolution}")
        self.latent_side = resolution // pipe.vae_scale_factor
        image_tokens = (self.latent_side // 2) ** 2

        # Position ids of the rotary embedding: (image tokens, 3) from the latent grid, and zeros for the
        # text, which FluxPipeline.encode_prompt pads to max_sequence_length T5 tokens.
        self.image_ids = FluxPipeline._prepare_latent_image_ids(
            None, self.latent_side // 2, self.latent_side // 2, device, self.transformer.dtype
        )
        self.text_ids = torch.zeros(max_sequence_length, 3, device=device, dtype=self.transformer.dtype)

        # The timesteps of FluxPipeline.__call__: linear sigmas from 1, shifted by mu, which grows with
        # the number of image tokens. sigmas gains a final 0, so it has one entry more than timesteps.
        self.scheduler = pipe.scheduler
        config = self.scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / sampling_steps, sampling_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        self.timesteps, _ = retrieve_timesteps(self.scheduler, sampling_steps, device, sigmas=sigmas, mu=mu)
        self.sigmas = self.scheduler.sigmas.to(device)

        # A model without a guidance embedding, such as FLUX.1 [schnell], takes guidance=None.
        self.guidance = None
        if self.transformer.config.guidance_embeds:
            self.guidance = torch.tensor([guidance], device=device, dtype=torch.float32)

    def predict(self, x_t, timesteps, cond):
        """Velocity v(x_t, t, prompt) from the transformer, with whatever LoRA factors are set.

        x_t: (batch, image tokens, 64); timesteps: (batch,) on the scheduler's 0-1000 scale.
        """
        batch = x_t.shape[0]
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            # FluxPipeline rounds t to the model dtype and divides it by 1000, and the model multiplies back.
            timestep=timesteps.to(dtype) / 1000,
            guidance=None if self.guidance is None else self.guidance.expand(batch),
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=self.text_ids,
            img_ids=self.image_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def sample_x_t(self, cond, uncond, stop, generator):
        """Denoise from pure noise for `stop` Euler steps, as FluxPipeline does.

        `uncond` is unused: FLUX.1 [dev] takes guidance as an input instead of an unconditional pass.
        With a CPU generator and fp32 weights, x_t equals FluxPipeline's latents after `stop` steps.
        Returns x_t: (batch, image tokens, 64) and its timesteps: (batch,).
        """
        batch = cond["prompt_embeds"].shape[0]
        device = self.sigmas.device

        # Noise drawn as FluxPipeline draws it, then packed:
        # (batch, 16, side, side) -> (batch, side / 2 * side / 2, 64).
        shape = (batch, self.num_channels_latents, self.latent_side, self.latent_side)
        noise = torch.randn(shape, generator=generator)
        x_t = FluxPipeline._pack_latents(noise, *shape).to(device)

        # FlowMatchEulerDiscreteScheduler.step: x <- x + (sigma_next - sigma) * v, computed in fp32.
        for index in range(stop):
            velocity = self.predict(x_t, self.timesteps[index].expand(batch), cond)
            x_t = x_t.float() + (self.sigmas[index + 1] - self.sigmas[index]) * velocity.float()

        timesteps = self.timesteps[stop].expand(batch)
        return x_t, timesteps


def free_text_encoders(pipe, device):
    """Drop the text encoders and the VAE, which training never calls once the prompts are encoded.

    T5-XXL alone has 4.7 billion parameters, so this frees about 9.5 GB in bf16.
    """
    pipe.text_encoder = None
    pipe.text_encoder_2 = None
    pipe.vae = None
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def check_resume_checkpoint(path):
    """Reject a --resume checkpoint of another model family before the model is loaded."""
    config = common.load_checkpoint(path)["config"]
    if config["family"] != "flux":
        raise common.UserError(
            f"cannot resume from {path}: it was trained for {config['model']}, a "
            f"{common.FAMILY_NAMES[config['family']]} model, and train_flux.py trains Flux models"
        )


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device, args.dtype, torch_dtype = common.resolve_device_and_dtype(args.device, args.dtype, cuda_default="bf16")

    # Check the concepts and the checkpoint to resume before loading the model, which can take minutes.
    concepts = trainer.read_concepts(args)
    if args.resume:
        check_resume_checkpoint(args.resume)

    # The frozen model: one transformer, whose LoRA can be switched off for the base predictions.
    # The denoiser is built first because it checks --resolution against the VAE, before any encoding.
    pipe = common.load_pipeline(args.model, "flux", torch_dtype, device)
    transformer = pipe.transformer
    denoiser = FluxDenoiser(pipe, args.resolution, args.sampling_steps, args.guidance, args.max_sequence_length, device)
    layers = inject_lora(transformer, args.target, args.rank, args.alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(trainer.lora_checkpoint_function(layers))

    # Prompts: each concept inside every template, its anchor in the same template, and retain prompts.
    templates = common.read_lines(args.templates_file, "templates") if args.templates_file else common.DEFAULT_TEMPLATES
    erase_prompts, anchor_prompts, retain_prompts = trainer.build_prompts(
        args, concepts, lambda concept: templates, common.BUILTIN_RETAIN_PROMPTS
    )

    # Text embeddings are computed once, and then the text encoders are freed.
    erase_cond = encode_prompts(pipe, erase_prompts, args.max_sequence_length, device)
    anchor_cond = encode_prompts(pipe, anchor_prompts, args.max_sequence_length, device)
    retain_cond = encode_prompts(pipe, retain_prompts, args.max_sequence_length, device)
    free_text_encoders(pipe, device)
    prompts = {
        "erase_cond": erase_cond,
        "anchor_cond": anchor_cond,
        "retain_cond": retain_cond,
        "uncond": None,  # Flux has no classifier-free guidance batch (FluxDenoiser.sample_x_t)
        "erase_pooled": erase_cond["pooled_prompt_embeds"].float(),
        "retain_pooled": retain_cond["pooled_prompt_embeds"].float(),
    }

    # The hypernetwork reads CLIP's pooled embedding: (n, 768) for FLUX.1.
    network = trainer.build_network(args, layers, embed_dim=prompts["erase_pooled"].shape[-1]).to(device)
    erasure = trainer.ErasureTrainer(args, denoiser, layers, network, prompts, device, torch_dtype)

    trainer.run_training(erasure, "flux", transformer, concepts, erase_prompts, retain_prompts)


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
