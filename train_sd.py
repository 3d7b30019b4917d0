"""Train a hypernetwork that erases concepts from Stable Diffusion 1.x/2.x.

    python train_sd.py --concept "van gogh"                                # SD 1.4 from the Hub
    python train_sd.py --concept "tom cruise" --anchor "a man" --target xattn
    python train_sd.py --concept nudity --anchor "a fully dressed person" --target noxattn
    python train_sd.py --model toy --concept circle                       # the shipped toy model, CPU
    python train_sd.py --model toy --concept circle --resume ckpt.pt      # continue a run

The UNet stays frozen. Its attention layers get LoRA adapters whose factors the hypernetwork writes
from the prompt's pooled CLIP text embedding. Training follows ESD's negative guidance: on an erase
prompt the LoRA-equipped UNet learns to predict eps_a - eta * (eps_p - eps_a), pointing away from the
concept, while on retain prompts the generated LoRA stays at zero.
"""

import argparse

import torch
from diffusers import DDIMScheduler

import common
import trainer
from lora_inject import TARGET_SETS, inject_lora

# Defaults for the shipped toy model, measured to erase a shape in a few minutes on 2 CPU cores.
# A stronger negative guidance and learning rate than on SD: with eta = 1 and lr 1e-3, 300 steps left
# about a third of the circles. Options given on the command line override them.
TOY_PRESET = {
    "steps": 300,
    "batch_size": 8,
    "lr": 3e-3,
    "negative_guidance": 3.0,
    "trajectory_steps": 50,
    "hidden_dim": 128,
    "start_guidance": 4.0,
    "sampling_steps": 20,
    "xt_cache": 256,
    "save_every": 100,
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trainer.add_training_arguments(
        parser,
        default_model="CompVis/stable-diffusion-v1-4",
        default_target="xattn",
        targets=list(TARGET_SETS["sd"]),
        default_hidden_dim=512,
    )
    parser.add_argument("--start-guidance", type=float, default=3.0,
                        help="classifier-free guidance scale when sampling x_t (ESD uses 3)")
    parser.add_argument("--sampling-steps", type=int, default=50,
                        help="DDIM steps of the sampler that produces x_t; training stops it at a random step")
    args = trainer.parse_args_with_presets(parser, {"toy": TOY_PRESET})
    trainer.validate_args(args)
    return args


class StableDiffusionDenoiser:
    """The UNet's noise prediction and ESD's way of drawing x_t, for the shared trainer."""

    def __init__(self, pipe, sampling_steps, start_guidance):
        self.unet = pipe.unet
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(sampling_steps)
        self.start_guidance = start_guidance
        self.latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)

    def predict(self, x_t, timesteps, cond):
        """eps(x_t, t, prompt) from the UNet, with whatever LoRA factors are set."""
        x_t = x_t.to(self.unet.dtype)
        return self.unet(x_t, timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample

    @torch.no_grad()
    def sample_x_t(self, cond, uncond, stop, generator):
        """Denoise from pure noise for `stop` DDIM steps with classifier-free guidance.

        Returns x_t: (batch, channels, height, width) and its timesteps: (batch,).
        """
        batch = cond["prompt_embeds"].shape[0]
        device = self.unet.device
        x_t = torch.randn((batch, *self.latent_shape), generator=generator).to(device) * self.scheduler.init_noise_sigma
        prompt_embeds = torch.cat([uncond["prompt_embeds"].expand(batch, -1, -1), cond["prompt_embeds"]])

        for t in self.scheduler.timesteps[:stop]:
            # (2 * batch, ...): [unconditional, conditional], the order the LoRA layers tile factors in.
            eps_uncond, eps_cond = self.predict(torch.cat([x_t, x_t]), t, {"prompt_embeds": prompt_embeds}).chunk(2)
            eps = eps_uncond + self.start_guidance * (eps_cond - eps_uncond)
            x_t = self.scheduler.step(eps.float(), t, x_t.float()).prev_sample

        timesteps = self.scheduler.timesteps[stop].expand(batch).to(device)
        return x_t, timesteps


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)  # denormal floats can slow CPU training several times over
    device, args.dtype, torch_dtype = common.resolve_device_and_dtype(args.device, args.dtype)
    # Check the concepts before loading the model, which can take minutes.
    concepts = trainer.read_concepts(args)

    # The frozen model: one copy, whose LoRA can be switched off for the base predictions.
    pipe = common.load_pipeline(args.model, "sd", torch_dtype, device)
    layers = inject_lora(pipe.unet, args.target, args.rank, args.alpha)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(trainer.lora_checkpoint_function(layers))
    pipe.unet.train(args.gradient_checkpointing)  # diffusers checkpoints only in training mode

    # Prompts: each concept inside every template, its anchor in the same template, and retain prompts.
    if common.is_toy_model(args.model) and not args.templates_file:
        templates_for, builtin_retain = common.toy_concept_templates, common.toy_retain_prompts(concepts)
    else:
        templates = common.read_lines(args.templates_file, "templates") if args.templates_file else common.DEFAULT_TEMPLATES
        templates_for, builtin_retain = (lambda concept: templates), common.BUILTIN_RETAIN_PROMPTS
    erase_prompts, anchor_prompts, retain_prompts = trainer.build_prompts(args, concepts, templates_for, builtin_retain)

    # Text embeddings are computed once; the hypernetwork reads the pooled ones.
    erase_embeds, erase_pooled = common.encode_sd_prompts(pipe, erase_prompts)
    anchor_embeds, _ = common.encode_sd_prompts(pipe, anchor_prompts)
    retain_embeds, retain_pooled = common.encode_sd_prompts(pipe, retain_prompts)
    uncond_embeds, _ = common.encode_sd_prompts(pipe, [""])
    prompts = {
        "erase_cond": {"prompt_embeds": erase_embeds},
        "anchor_cond": {"prompt_embeds": anchor_embeds},
        "retain_cond": {"prompt_embeds": retain_embeds},
        "uncond": {"prompt_embeds": uncond_embeds},
        "erase_pooled": erase_pooled.float(),
        "retain_pooled": retain_pooled.float(),
    }

    network = trainer.build_network(args, layers, embed_dim=erase_pooled.shape[-1]).to(device)
    denoiser = StableDiffusionDenoiser(pipe, args.sampling_steps, args.start_guidance)
    erasure = trainer.ErasureTrainer(args, denoiser, layers, network, prompts, device, torch_dtype)

    trainer.run_training(erasure, "sd", pipe.unet, concepts, erase_prompts, retain_prompts)


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
