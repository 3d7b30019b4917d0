"""Measure what the hypernetwork costs on top of the model it edits.

    python benchmarks/bench.py            # CPU: SD 1.4's UNet layout at reduced width, a few minutes
    python benchmarks/bench.py --full     # GPU: the real SD 1.4 UNet shapes, random weights, no download

Four figures, each the median of --repeats timed runs after a warm-up, printed with its ratio:
  1. one training update: hypernetwork (direct objective, and a `fields` update per inner pass) against
     a static LoRA of the same targets and rank, and against the frozen model's forward/backward alone;
  2. sampling one image: with the hypernetwork against the plain diffusers pipeline, same scheduler,
     steps and seed;
  3. one `fields` update with 1, 10 and 100 erase concepts;
  4. peak memory of a training update against ESD's layout, which keeps a second, frozen copy of the model.
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from hypernet import HyperNetwork, StaticLoRA, count_parameters  # noqa: E402
from lora_inject import clear_lora_factors, inject_lora, layer_shapes, set_lora_factors  # noqa: E402

# SD 1.4's UNet layout. The CPU run keeps every block, attention layer and the 768-wide text context,
# and divides the channel widths by 10 so that one training update takes about a second on 2 cores.
SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
REDUCED_UNET = dict(SD14_UNET, sample_size=32, block_out_channels=(32, 64, 128, 128), norm_num_groups=32)
TEXT_TOKENS = 77  # CLIP ViT-L/14's context length, the number of text tokens SD 1.4's cross-attention attends to
RANK = 4
HIDDEN_DIM = 512
TRAJECTORY_STEPS = 300
INNER_STEPS = 4  # K of the timed `fields` update


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="real SD 1.4 UNet shapes on a CUDA GPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is reported")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per training update")
    parser.add_argument("--sampling-steps", type=int, default=10, help="denoising steps per image when sampling")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--memory-probe", choices=["unhype", "esd"], help=argparse.SUPPRESS)
    return parser.parse_args()


def median_seconds(function, repeats, device):
    """Median wall time of function() over `repeats` runs, after one warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD14_UNET if args.full else REDUCED_UNET))
    return unet.to(device, dtype)


def random_batch(unet, batch, device, dtype):
    size = unet.config.sample_size
    x_t = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    prompt_embeds = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled_prompt_embeds = torch.randn(batch, unet.config.cross_attention_dim, device=device)
    target = torch.randn_like(x_t)
    return x_t, timesteps, prompt_embeds, pooled_prompt_embeds, target


# ----------------------------------------------------------------------------------------------------
# 1. Training updates

def training_figures(args, device, dtype):
    unet = build_unet(args, device, dtype)
    layers = inject_lora(unet, "xattn", RANK, RANK)
    shapes = layer_shapes(layers)
    x_t, timesteps, prompt_embeds, pooled, target = random_batch(unet, args.batch_size, device, dtype)

    def loss_with(factors):
        set_lora_factors(layers, factors)
        eps = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        clear_lora_factors(layers)
        return F.mse_loss(eps.float(), target.float())

    # The floor: the frozen UNet's forward and backward, with the gradient taken on its input.
    x_floor = x_t.clone().requires_grad_(True)

    def floor_step():
        eps = unet(x_floor, timesteps, encoder_hidden_states=prompt_embeds).sample
        F.mse_loss(eps.float(), target.float()).backward()

    def make_step(network):
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_with(network(pooled, TRAJECTORY_STEPS)).backward()
            optimizer.step()
        return step

    static = StaticLoRA(shapes, RANK).to(device)
    hypernet = HyperNetwork(shapes, pooled.shape[-1], RANK, HIDDEN_DIM, TRAJECTORY_STEPS).to(device)
    fields_optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)

    def fields_update():
        # K plain gradient steps on the factors from H(e, s), then one regression step of H.
        with torch.no_grad():
            start = hypernet(pooled, 0)
        theta = {name: (A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for name, (A, B) in start.items()}
        for _ in range(INNER_STEPS):
            leaves = [tensor for pair in theta.values() for tensor in pair]
            grads = torch.autograd.grad(loss_with(theta), leaves)
            with torch.no_grad():
                for leaf, grad in zip(leaves, grads):
                    leaf -= 0.1 * grad
        predicted = hypernet(pooled, INNER_STEPS)
        loss = sum((predicted[name][0] - A).pow(2).sum() + (predicted[name][1] - B).pow(2).sum() for name, (A, B) in theta.items())
        fields_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fields_optimizer.step()

    floor = median_seconds(floor_step, args.repeats, device)
    static_step = median_seconds(make_step(static), args.repeats, device)
    direct_step = median_seconds(make_step(hypernet), args.repeats, device)
    fields_per_pass = median_seconds(fields_update, args.repeats, device) / INNER_STEPS
    return {
        "lora_layers": len(layers),
        "hypernetwork_parameters": count_parameters(hypernet),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "floor_forward_backward_s": floor,
        "static_lora_step_s": static_step,
        "hypernet_direct_step_s": direct_step,
        "hypernet_fields_per_inner_pass_s": fields_per_pass,
        "ratio_direct_over_static": direct_step / static_step,
        "ratio_fields_pass_over_static": fields_per_pass / static_step,
        "ratio_static_over_floor": static_step / floor,
    }


# ----------------------------------------------------------------------------------------------------
# 2. Sampling

def sampling_figures(args, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from toy_world import build_tokenizer

    unet = build_unet(args, device, dtype)
    tokenizer = build_tokenizer(["a", "photo", "of", "cat", "painting", "by", "van", "gogh"], TEXT_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2 if not args.full else 12,
        num_attention_heads=12, max_position_embeddings=TEXT_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32) if not args.full else (128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=32, layers_per_block=1 if not args.full else 2)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a painting by van gogh"

    def plain():
        pipe(prompt, num_inference_steps=args.sampling_steps, generator=torch.Generator().manual_seed(0))

    plain_s = median_seconds(plain, args.repeats, device)

    # Factors are generated once per prompt and stay set for every step and both guidance branches.
    layers = inject_lora(unet, "xattn", RANK, RANK)
    hypernet = HyperNetwork(layer_shapes(layers), 768, RANK, HIDDEN_DIM, TRAJECTORY_STEPS).to(device).eval()

    def with_hypernet():
        pooled = common.encode_pooled(pipe, [prompt])
        set_lora_factors(layers, common.generate_factors(hypernet, pooled.to(device)))
        pipe(prompt, num_inference_steps=args.sampling_steps, generator=torch.Generator().manual_seed(0))
        clear_lora_factors(layers)

    hypernet_s = median_seconds(with_hypernet, args.repeats, device)
    return {"plain_pipeline_s": plain_s, "with_hypernet_s": hypernet_s, "ratio_hypernet_over_plain": hypernet_s / plain_s}


# ----------------------------------------------------------------------------------------------------
# 3. Number of erase concepts

def concept_scaling_figures(args, device, dtype):
    """Time a `fields` update with prompt tables for 1, 10 and 100 concepts of 10 templates each."""
    from diffusers import DDIMScheduler

    import trainer
    from train_sd import StableDiffusionDenoiser

    unet = build_unet(args, device, dtype)
    layers = inject_lora(unet, "xattn", RANK, RANK)
    # The denoiser needs only the pipeline's UNet and scheduler.
    pipe = argparse.Namespace(unet=unet, scheduler=DDIMScheduler())
    denoiser = StableDiffusionDenoiser(pipe, sampling_steps=4, start_guidance=3.0)
    options = argparse.Namespace(
        alpha=RANK, rank=RANK, batch_size=args.batch_size, sampling_steps=4, xt_cache=0, max_jump=INNER_STEPS,
        inner_lr=0.1, inner_step_norm=0.3, negative_guidance=1.0, retain_weight=1.0, norm_weight=0.1,
    )
    width = unet.config.cross_attention_dim

    def prompt_table(rows):
        return torch.randn(rows, TEXT_TOKENS, width, device=device, dtype=dtype)

    figures = {}
    for concepts in (1, 10, 100):
        rows = concepts * 10
        prompts = {
            "erase_cond": {"prompt_embeds": prompt_table(rows)},
            "anchor_cond": {"prompt_embeds": prompt_table(rows)},
            "retain_cond": {"prompt_embeds": prompt_table(24)},
            "uncond": {"prompt_embeds": prompt_table(1)},
            "erase_pooled": torch.randn(rows, width, device=device),
            "retain_pooled": torch.randn(24, width, device=device),
        }
        torch.manual_seed(0)
        hypernet = HyperNetwork(layer_shapes(layers), width, RANK, HIDDEN_DIM, TRAJECTORY_STEPS).to(device)
        erasure = trainer.ErasureTrainer(options, denoiser, layers, hypernet, prompts, device, torch.float32)
        optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)

        def update():
            generator.manual_seed(0)  # the same jump lengths and sampler stops for every table size
            loss, _ = erasure.fields_loss(generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        figures[f"fields_update_{concepts}_concepts_s"] = median_seconds(update, args.repeats, device)
    figures["ratio_100_over_1"] = figures["fields_update_100_concepts_s"] / figures["fields_update_1_concepts_s"]
    return figures


# ----------------------------------------------------------------------------------------------------
# 4. Peak memory

def process_memory_kib(field):
    """Return a field of /proc/self/status in KiB: VmRSS is the resident set now, VmHWM its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident set


def peak_memory_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return process_memory_kib("VmHWM") * 1024


def memory_probe(args, layout, device, dtype):
    """Run one training update in the given layout and print the peak memory it added to the process."""
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else process_memory_kib("VmRSS") * 1024
    unet = build_unet(args, device, dtype)
    x_t, timesteps, prompt_embeds, pooled, target = random_batch(unet, args.batch_size, device, dtype)

    if layout == "esd":
        # ESD: a trainable copy (here its cross-attention keys and values, ESD-x) and a frozen copy
        # that computes the targets.
        frozen = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(False)
        trainable = [p for name, p in unet.named_parameters() if "attn2.to_k" in name or "attn2.to_v" in name]
        for parameter in trainable:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        with torch.no_grad():
            eps_target = frozen(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        eps = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
    else:
        # unhype: one frozen copy; the LoRA is switched off for the targets.
        layers = inject_lora(unet, "xattn", RANK, RANK)
        hypernet = HyperNetwork(layer_shapes(layers), pooled.shape[-1], RANK, HIDDEN_DIM, TRAJECTORY_STEPS).to(device)
        optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)
        with torch.no_grad():
            eps_target = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        set_lora_factors(layers, hypernet(pooled, TRAJECTORY_STEPS))
        eps = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample

    F.mse_loss(eps.float(), eps_target.float()).backward()
    optimizer.step()
    print(json.dumps({"added_peak_bytes": peak_memory_bytes(device) - before}))


def memory_figures(args):
    """Run each layout in its own process, so one's peak does not hide the other's."""
    added = {}
    for layout in ("unhype", "esd"):
        command = [sys.executable, __file__, "--memory-probe", layout, "--batch-size", str(args.batch_size)]
        if args.full:
            command.append("--full")
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        added[layout] = json.loads(output.strip().splitlines()[-1])["added_peak_bytes"]
    return {
        "unhype_peak_mib": added["unhype"] / 2**20,
        "esd_two_copies_peak_mib": added["esd"] / 2**20,
        "ratio_unhype_over_esd": added["unhype"] / added["esd"],
    }


def main():
    args = parse_args()
    torch.set_flush_denormal(True)  # denormal floats can slow CPU kernels several times over
    device = "cuda" if args.full else "cpu"
    if args.full and not torch.cuda.is_available():
        raise common.UserError("--full needs a CUDA GPU; run without --full on a CPU")
    dtype = torch.float16 if args.full else torch.float32

    if args.memory_probe:
        memory_probe(args, args.memory_probe, device, dtype)
        return

    figures = {"device": torch.cuda.get_device_name() if args.full else "cpu", "threads": torch.get_num_threads()}
    sections = [
        ("training update", lambda: training_figures(args, device, dtype)),
        ("sampling one image", lambda: sampling_figures(args, device, dtype)),
        ("erase concepts", lambda: concept_scaling_figures(args, device, dtype)),
        ("peak memory", lambda: memory_figures(args)),
    ]
    for title, measure in sections:
        results = measure()
        print(f"{title}:")
        for name, value in results.items():
            print(f"  {name:40s} {value:.4g}" if isinstance(value, float) else f"  {name:40s} {value}")
        figures.update(results)

    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
