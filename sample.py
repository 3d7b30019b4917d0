"""Generate images with a model whose concepts were erased by a trained hypernetwork.

    python sample.py --hypernet ckpt.pt --prompt "a painting by van gogh" --prompt "a photo of a cat"
    python sample.py --hypernet ckpt.pt --prompts-file prompts.txt --num-images 4 --compare
    python sample.py --model toy --prompt "a red circle"                 # the base model alone

For every prompt the hypernetwork runs once, and the LoRA it writes stays on for all denoising steps
and both guidance branches. Its strength ||dW|| is printed per prompt: large on prompts that touch an
erased concept, near zero elsewhere. --compare also renders the base model from the same seeds and
saves a grid with base and erased images side by side.
"""

import argparse
import re
from pathlib import Path

import torch

import common
from lora_inject import clear_lora_factors

# Sampling settings of the toy model, used unless --steps or --guidance-scale is given.
TOY_STEPS = 25
TOY_GUIDANCE_SCALE = 4.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernet", help="checkpoint from train_sd.py or train_flux.py (default: base model only)")
    parser.add_argument("--model", help="hub id or local folder; 'toy' is the shipped toy model (default: the checkpoint's)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt to render; repeatable")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds seed, seed + 1, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image of every prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 50 for SD, 28 for Flux, 25 for the toy)")
    parser.add_argument("--guidance-scale", type=float,
                        help="guidance scale (default: 7.5 for SD, 3.5 for Flux, 4 for the toy)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--compare", action="store_true", help="also render the base model and save a side-by-side grid")
    parser.add_argument("--out-dir", default="samples", help="folder for the PNG files")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                        help="model dtype (default on CUDA: bf16 for Flux, fp16 for SD; fp32 on CPU)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args()

    if args.num_images < 1:
        raise common.UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.prompts_file:
        args.prompt += common.read_lines(args.prompts_file, "prompts")
    if not args.prompt:
        raise common.UserError("no prompt: pass --prompt \"a photo of a cat\" or --prompts-file FILE")
    return args


def default_sampling(model, family):
    """(steps, guidance scale) that suit the model: the toy model, Flux [dev] or Stable Diffusion."""
    if common.is_toy_model(model):
        return TOY_STEPS, TOY_GUIDANCE_SCALE
    return (28, 3.5) if family == "flux" else (50, 7.5)


def render(pipe, prompt_inputs, seeds, args, **pipeline_kwargs):
    """Render one encoded prompt at the given seeds, one generator per image so each image depends only on its seed."""
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    output = pipe(
        **prompt_inputs,
        num_images_per_prompt=len(seeds),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=generators,
        **pipeline_kwargs,
    )
    return output.images


def slug(text, max_length=60):
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_length] or "prompt"


def main():
    args = parse_args()
    checkpoint = common.load_checkpoint(args.hypernet) if args.hypernet else None
    model = args.model or (checkpoint["config"]["model"] if checkpoint else "CompVis/stable-diffusion-v1-4")

    # The checkpoint sets the model family. Without one, a local folder's model_index.json does.
    model_family = common.local_model_family(model)
    family = checkpoint["config"]["family"] if checkpoint else (model_family or "sd")
    if checkpoint and model_family not in (None, family):
        trained_for = checkpoint["config"]["model"]
        raise common.UserError(
            f"checkpoint {args.hypernet} was trained for {trained_for}, a {common.FAMILY_NAMES[family]} model, "
            f"but {model} is a {common.FAMILY_NAMES[model_family]} model: pass a {common.FAMILY_NAMES[family]} "
            f"model with --model, or leave --model out to use {trained_for}"
        )

    # Flux runs in bf16 on CUDA: in fp16, activations of its text encoders overflow unless clipped
    # (diffusers Flux documentation).
    cuda_default = "bf16" if family == "flux" else "fp16"
    device, args.dtype, torch_dtype = common.resolve_device_and_dtype(args.device, args.dtype, cuda_default)

    # A Flux LoRA is trained with a fixed T5 context length; sampling uses the same one.
    pipeline_kwargs = {}
    if family == "flux" and checkpoint:
        pipeline_kwargs["max_sequence_length"] = checkpoint["config"]["args"].get("max_sequence_length", 512)

    steps, guidance_scale = default_sampling(model, family)
    args.steps = args.steps or steps
    args.guidance_scale = guidance_scale if args.guidance_scale is None else args.guidance_scale

    pipe = common.load_pipeline(model, family, torch_dtype, device)
    if checkpoint:
        layers, network = common.attach_checkpoint(pipe, checkpoint, args.hypernet, model)
        concepts = ", ".join(concept for concept, _ in checkpoint["config"]["concepts"])
        print(f"{args.hypernet}: erases {concepts} from {model}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.num_images)]
    rows = []
    for prompt in args.prompt:
        prompt_inputs, pooled = common.encode_for_sampling(pipe, prompt, pipeline_kwargs.get("max_sequence_length"))
        base_images = render(pipe, prompt_inputs, seeds, args, **pipeline_kwargs) if args.compare or not checkpoint else []
        images = base_images
        if checkpoint:
            factors = common.generate_factors(network, pooled.to(device))
            strength = common.apply_factors(layers, factors, checkpoint["config"]["alpha"] / checkpoint["config"]["rank"])
            images = render(pipe, prompt_inputs, seeds, args, **pipeline_kwargs)
            clear_lora_factors(layers)
            print(f"|dW| = {strength.item():8.4f}  {prompt}")

        for seed, image in zip(seeds, images):
            image.save(out_dir / f"{slug(prompt)}_{seed}.png")
        if args.compare and checkpoint:
            for seed, base, erased in zip(seeds, base_images, images):
                base.save(out_dir / f"{slug(prompt)}_{seed}_base.png")
                rows.append(([prompt, f"seed {seed}, |dW| = {strength.item():.4g}"], [base, erased]))

    if rows:
        common.labelled_grid(rows, ["base", "erased"]).save(out_dir / "compare.png")
        print(f"saved {out_dir / 'compare.png'}: base model on the left, erased model on the right, one row per image")
    copies = 2 if args.compare and checkpoint else 1  # --compare also saves the base model's images
    print(f"saved {len(args.prompt) * len(seeds) * copies} images to {out_dir}/")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
