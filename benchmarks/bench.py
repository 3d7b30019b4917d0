"""Measure what the hypernetwork costs on top of the model it edits.

    python benchmarks/bench.py            # CPU: SD 1.4's and FLUX.1-dev's layouts at reduced width, minutes
    python benchmarks/bench.py --full     # GPU: the real SD 1.4 and FLUX.1-dev shapes, random weights

Four figures, each the median of --repeats timed runs after a warm-up, printed with its ratio:
  1. one training update, on SD's UNet and on Flux's transformer: hypernetwork (direct objective, and a
     `fields` update per inner pass) against a static LoRA of the same targets and rank, and against the
     frozen model's forward/backward alone, with the hypernetwork's own share (its forward and
     backward, its optimizer step) timed apart;
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
# and divides the channel widths by 4, so that one training update takes under a second on 2 cores.
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
WIDTH_DIVISOR = 4
REDUCED_UNET = dict(
    SD14_UNET,
    sample_size=32,
    block_out_channels=tuple(width // WIDTH_DIVISOR for width in SD14_UNET["block_out_channels"]),
    norm_num_groups=16,  # 80 channels do not split into SD's 32 groups
)
# FLUX.1-dev's transformer. The CPU run keeps all 57 blocks, the 128-wide attention heads and the
# 4096-wide T5 context, and 2 of the 24 heads.
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
REDUCED_FLUX = dict(FLUX_DEV, num_attention_heads=2)
# (pixels, T5 tokens) of one training sample: train_flux.py's defaults with --full, fewer tokens on CPU.
# 256 pixels make 256 image tokens after FluxPipeline's 8x VAE and 2x2 packing.
FLUX_SAMPLE = {"full": (512, 512), "reduced": (256, 128)}
FLUX_HIDDEN_DIM = 100  # train_flux.py's default

# SD 1.4's noise schedule, as its DDIM sampler is configured.
SD14_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)
TEXT_TOKENS = 77  # CLIP ViT-L/14's context length, the number of text tokens SD 1.4's cross-attention attends to
RANK = 4
SD14_HIDDEN_DIM = 512  # train_sd.py's default for Stable Diffusion
TRAJECTORY_STEPS = 300
INNER_STEPS = 4  # K of the timed `fields` update


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="real SD 1.4 and FLUX.1-dev shapes on a CUDA GPU")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is reported")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per training update")
    parser.add_argument(
        "--hidden-dim",
        type=int,
        help="hypernetwork width (default: 512 with --full; on CPU, the width at which the hypernetwork is the "
        "same share of the reduced UNet as of SD 1.4's, with 512 timed alongside)",
    )
    parser.add_argument("--sampling-steps", type=int, default=10, help="denoising steps per image when sampling")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--memory-probe", choices=["unhype", "esd"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def xattn_layout(unet_config):
    """Return (LoRA layer shapes of the `xattn` set, UNet parameter count), built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    return layer_shapes(inject_lora(unet, "xattn", RANK, RANK)), sum(p.numel() for p in unet.parameters())


def hypernet_parameters(shapes, hidden_dim):
    with torch.device("meta"):
        return count_parameters(HyperNetwork(shapes, SD14_UNET["cross_attention_dim"], RANK, hidden_dim, TRAJECTORY_STEPS))


def matched_hidden_dim(unet_config):
    """Return the hypernetwork width, in steps of 16, whose share of this UNet is closest to 512's on SD 1.4.

    Shrinking the UNet's channels does not shrink the hypernetwork: its heads write lora_A for the
    768-wide text context, which the reduced UNet keeps. At width 512 on the reduced UNet it would be
    a far larger share of the model than on SD 1.4 (about 1.3%), and its fixed cost would swamp a
    ratio meant to predict the real model's.
    """
    sd_shapes, sd_parameters = xattn_layout(SD14_UNET)
    target = hypernet_parameters(sd_shapes, SD14_HIDDEN_DIM) / sd_parameters
    shapes, parameters = xattn_layout(unet_config)
    widths = range(16, SD14_HIDDEN_DIM + 1, 16)
    return min(widths, key=lambda width: abs(hypernet_parameters(shapes, width) / parameters - target))


def interleaved_medians(functions, repeats, device):
    """Return {name: median wall time} of each function, after one warm-up run of each.

    The functions run in turn, round after round, so a drift in the machine's speed (another process,
    the CPU's clock) hits all of them alike instead of whichever was timed during it.
    """
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            function()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(function, repeats, device):
    return interleaved_medians({"function": function}, repeats, device)["function"]


def build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD14_UNET if args.full else REDUCED_UNET))
    return unet.to(device, dtype) if args.full else unet  # the CPU run keeps fp32


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

def update_figures(args, device, model, target_set, predict, x_t, target, pooled, hidden_dims):
    """Time one training update on `model` with a hypernetwork, a static LoRA and no LoRA at all.

    predict(x) runs the model on the noisy input x with whatever LoRA factors are set.
    """
    import trainer

    layers = inject_lora(model, target_set, RANK, RANK)
    shapes = layer_shapes(layers)

    def loss_with(factors):
        set_lora_factors(layers, factors)
        prediction = predict(x_t)
        clear_lora_factors(layers)
        return F.mse_loss(prediction.float(), target.float())

    # The floor: the frozen model's forward and backward, with the gradient taken on its input.
    x_floor = x_t.clone().requires_grad_(True)

    def floor_step():
        F.mse_loss(predict(x_floor).float(), target.float()).backward()

    def make_step(network):
        optimizer = trainer.make_optimizer(network.parameters(), lr=1e-4)  # the optimizer training uses

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_with(network(pooled, TRAJECTORY_STEPS)).backward()
            optimizer.step()
        return step

    def make_fields_update(hypernet):
        optimizer = trainer.make_optimizer(hypernet.parameters(), lr=1e-4)

        def update():
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return update

    static = StaticLoRA(shapes, RANK).to(device)
    hypernets = {
        hidden_dim: HyperNetwork(shapes, pooled.shape[-1], RANK, hidden_dim, TRAJECTORY_STEPS).to(device)
        for hidden_dim in hidden_dims
    }
    steps = {"floor": floor_step, "static": make_step(static)}
    for hidden_dim, hypernet in hypernets.items():
        steps[f"direct{hidden_dim}"] = make_step(hypernet)
        steps[f"fields{hidden_dim}"] = make_fields_update(hypernet)
    seconds = interleaved_medians(steps, args.repeats, device)

    static_step = seconds["static"]
    figures = {
        "lora_layers": len(layers),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "floor_forward_backward_s": seconds["floor"],
        "static_lora_step_s": static_step,
        "ratio_static_over_floor": static_step / seconds["floor"],
    }

    for hidden_dim, hypernet in hypernets.items():
        direct_step = seconds[f"direct{hidden_dim}"]
        fields_per_pass = seconds[f"fields{hidden_dim}"] / INNER_STEPS

        # The profile of the difference: the hypernetwork's own forward and backward (no model), and the
        # optimizer step over its parameters, fused as in training and looped as in AdamW's CPU default.
        def hypernet_alone():
            sum(A.sum() + B.sum() for A, B in hypernet(pooled, TRAJECTORY_STEPS).values()).backward()

        own_pass = median_seconds(hypernet_alone, args.repeats, device)
        fused = trainer.make_optimizer(hypernet.parameters(), lr=1e-4)
        looped = torch.optim.AdamW(hypernet.parameters(), lr=1e-4, weight_decay=0.0, foreach=False)

        name = f"hidden{hidden_dim}"
        figures.update({
            f"{name}_hypernetwork_parameters": count_parameters(hypernet),
            f"{name}_share_of_model": count_parameters(hypernet) / figures["model_parameters"],
            f"{name}_direct_step_s": direct_step,
            f"{name}_fields_per_inner_pass_s": fields_per_pass,
            f"{name}_ratio_direct_over_static": direct_step / static_step,
            f"{name}_ratio_fields_pass_over_static": fields_per_pass / static_step,
            f"{name}_profile_hypernet_forward_backward_s": own_pass,
            f"{name}_profile_adamw_fused_step_s": median_seconds(fused.step, args.repeats, device),
            f"{name}_profile_adamw_looped_step_s": median_seconds(looped.step, args.repeats, device),
        })
    return figures


def training_figures(args, device, dtype, hidden_dims):
    unet = build_unet(args, device, dtype)
    x_t, timesteps, prompt_embeds, pooled, target = random_batch(unet, args.batch_size, device, dtype)

    def predict(x):
        return unet(x, timesteps, encoder_hidden_states=prompt_embeds).sample

    return update_figures(args, device, unet, "xattn", predict, x_t, target, pooled, hidden_dims)


def flux_training_figures(args, device, dtype):
    """Time the same update on Flux's transformer (19 double-stream and 38 single-stream blocks)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    config = FLUX_DEV if args.full else REDUCED_FLUX
    if args.full:
        # Random weights for 12 B parameters, initialised on the GPU in bf16: 24 GB, where fp32 would
        # need 48 GB, and seconds, where the CPU would take minutes (estimates).
        # NOTE: never run on a GPU; the same bf16 construction was checked on the CPU with REDUCED_FLUX.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config)
        torch.set_default_dtype(default_dtype)
    else:
        transformer = FluxTransformer2DModel(**config)  # fp32 on the CPU

    # FluxPipeline packs each 2x2 patch of the 16-channel latent into one token: (batch, tokens, 64).
    resolution, text_tokens = FLUX_SAMPLE["full" if args.full else "reduced"]
    side = resolution // 16
    batch = args.batch_size
    x_t = torch.randn(batch, side * side, config["in_channels"], device=device, dtype=dtype)
    target = torch.randn_like(x_t)
    prompt_embeds = torch.randn(batch, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(batch, config["pooled_projection_dim"], device=device)
    image_ids = FluxPipeline._prepare_latent_image_ids(None, side, side, device, dtype)
    text_ids = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
    timesteps = torch.full((batch,), 0.5, device=device, dtype=dtype)
    guidance = torch.full((batch,), 3.5, device=device)

    def predict(x):
        return transformer(
            hidden_states=x, timestep=timesteps, guidance=guidance, pooled_projections=pooled.to(dtype),
            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]

    figures = update_figures(args, device, transformer, "vo", predict, x_t, target, pooled, [FLUX_HIDDEN_DIM])
    return {f"flux_{name}": value for name, value in figures.items()}


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
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD14_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a painting by van gogh"

    # The hypernetwork's pipeline has its own copy of the UNet, so the plain one runs without LoRA layers.
    lora_pipe = StableDiffusionPipeline(**dict(pipe.components, unet=copy.deepcopy(unet)), requires_safety_checker=False)
    lora_pipe.set_progress_bar_config(disable=True)
    layers = inject_lora(lora_pipe.unet, "xattn", RANK, RANK)
    hypernet = HyperNetwork(layer_shapes(layers), 768, RANK, args.hidden_dim, TRAJECTORY_STEPS).to(device).eval()

    def plain():
        pipe(prompt, num_inference_steps=args.sampling_steps, generator=torch.Generator().manual_seed(0))

    # Factors are generated once per prompt and stay set for every step and both guidance branches.
    # As sample.py does it: one text-encoder pass for both the pipeline and the hypernetwork.
    def with_hypernet():
        prompt_inputs, pooled = common.encode_for_sampling(lora_pipe, prompt)
        set_lora_factors(layers, common.generate_factors(hypernet, pooled.to(device)))
        lora_pipe(**prompt_inputs, num_inference_steps=args.sampling_steps, generator=torch.Generator().manual_seed(0))
        clear_lora_factors(layers)

    seconds = interleaved_medians({"plain": plain, "hypernet": with_hypernet}, args.repeats, device)

    # The profile: the hypernetwork's part (its forward pass, and folding the LoRA into the weights) is
    # paid once per prompt. After that a denoising step costs what the plain one does.
    _, pooled = common.encode_for_sampling(lora_pipe, prompt)

    def factors_and_merge():
        set_lora_factors(layers, common.generate_factors(hypernet, pooled.to(device)))
        with torch.no_grad():
            for layer in layers.values():
                layer.merged_weight()
        clear_lora_factors(layers)

    return {
        "plain_pipeline_s": seconds["plain"],
        "with_hypernet_s": seconds["hypernet"],
        "ratio_hypernet_over_plain": seconds["hypernet"] / seconds["plain"],
        "profile_factors_and_merge_per_prompt_s": median_seconds(factors_and_merge, args.repeats, device),
    }


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
    pipe = argparse.Namespace(unet=unet, scheduler=DDIMScheduler(**SD14_SCHEDULER))
    denoiser = StableDiffusionDenoiser(pipe, sampling_steps=4, start_guidance=3.0)
    options = argparse.Namespace(
        alpha=RANK, rank=RANK, batch_size=args.batch_size, sampling_steps=4, xt_cache=0, max_jump=INNER_STEPS,
        inner_lr=0.1, inner_step_norm=0.3, negative_guidance=1.0, retain_weight=1.0, norm_weight=0.1,
    )
    width = unet.config.cross_attention_dim

    def prompt_table(rows):
        return torch.randn(rows, TEXT_TOKENS, width, device=device, dtype=dtype)

    def make_update(concepts):
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
        hypernet = HyperNetwork(layer_shapes(layers), width, RANK, args.hidden_dim, TRAJECTORY_STEPS).to(device)
        erasure = trainer.ErasureTrainer(options, denoiser, layers, hypernet, prompts, device, torch.float32)
        optimizer = trainer.make_optimizer(hypernet.parameters(), lr=1e-4)
        generator = torch.Generator()

        def update():
            generator.manual_seed(0)  # the same jump lengths and sampler stops for every table size
            loss, _ = erasure.fields_loss(generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return update

    seconds = interleaved_medians({concepts: make_update(concepts) for concepts in (1, 10, 100)}, args.repeats, device)
    figures = {f"fields_update_{concepts}_concepts_s": value for concepts, value in seconds.items()}
    figures["ratio_100_over_1"] = seconds[100] / seconds[1]
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
    """Run one training update in the given layout and print the peak memory it added to the process.

    The peak is taken from the moment the models are built, so it counts their weights, the optimizer
    state and the update's activations, but not the transients of building them.
    """
    import trainer

    # Importing diffusers' model code costs over 100 MiB of resident memory: do it before the baseline.
    xattn_layout(SD14_UNET if args.full else REDUCED_UNET)

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
        optimizer = trainer.make_optimizer(trainable, lr=1e-5)
        if args.probe_checkpointing:
            unet.enable_gradient_checkpointing()
        reset_peak_memory(device)
        with torch.no_grad():
            eps_target = frozen(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        eps = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
    else:
        # unhype: one frozen copy; the LoRA is switched off for the targets.
        layers = inject_lora(unet, "xattn", RANK, RANK)
        hypernet = HyperNetwork(layer_shapes(layers), pooled.shape[-1], RANK, args.hidden_dim, TRAJECTORY_STEPS).to(device)
        optimizer = trainer.make_optimizer(hypernet.parameters(), lr=1e-4)
        if args.probe_checkpointing:
            unet.enable_gradient_checkpointing(trainer.lora_checkpoint_function(layers))
        reset_peak_memory(device)
        with torch.no_grad():
            eps_target = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        set_lora_factors(layers, hypernet(pooled, TRAJECTORY_STEPS))
        eps = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample
        clear_lora_factors(layers)

    F.mse_loss(eps.float(), eps_target.float()).backward()
    optimizer.step()
    print(json.dumps({"added_peak_bytes": peak_memory_bytes(device) - before}))


def memory_figures(args, hidden_dims):
    """Run each layout in its own process, so one's peak does not hide the other's.

    Both layouts are measured as they are, and again with gradient checkpointing. Checkpointing shrinks
    the activations, which the layouts share, and leaves the weights, of which ESD keeps two copies.
    """
    def probe(layout, hidden_dim, checkpointing):
        command = [sys.executable, __file__, "--memory-probe", layout, "--batch-size", str(args.batch_size),
                   "--hidden-dim", str(hidden_dim)]
        command += ["--full"] if args.full else []
        command += ["--probe-checkpointing"] if checkpointing else []
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(output.strip().splitlines()[-1])["added_peak_bytes"] / 2**20

    figures = {}
    for checkpointing in (False, True):
        mode = "checkpointing" if checkpointing else "plain"
        esd = probe("esd", hidden_dims[0], checkpointing)
        figures[f"{mode}_esd_two_copies_peak_mib"] = esd
        for hidden_dim in hidden_dims:
            unhype = probe("unhype", hidden_dim, checkpointing)
            figures[f"{mode}_hidden{hidden_dim}_unhype_peak_mib"] = unhype
            figures[f"{mode}_hidden{hidden_dim}_ratio_unhype_over_esd"] = unhype / esd
    return figures


def print_targets(figures, hidden_dim):
    """Print each ratio that has a target, the target, and whether this run met it."""
    checks = [
        (f"SD update, direct (width {hidden_dim}) / static LoRA", f"hidden{hidden_dim}_ratio_direct_over_static", 1.03),
        (f"SD update, fields pass (width {hidden_dim}) / static LoRA", f"hidden{hidden_dim}_ratio_fields_pass_over_static", 1.03),
        ("Flux update, direct / static LoRA", f"flux_hidden{FLUX_HIDDEN_DIM}_ratio_direct_over_static", 1.03),
        ("Flux update, fields pass / static LoRA", f"flux_hidden{FLUX_HIDDEN_DIM}_ratio_fields_pass_over_static", 1.03),
        ("sampling, hypernetwork / plain pipeline", "ratio_hypernet_over_plain", 1.01),
        ("fields update, 100 / 1 concepts", "ratio_100_over_1", 1.10),
        (f"peak memory / ESD (width {hidden_dim})", f"plain_hidden{hidden_dim}_ratio_unhype_over_esd", 0.6),
        (f"peak memory / ESD, checkpointing (width {hidden_dim})",
         f"checkpointing_hidden{hidden_dim}_ratio_unhype_over_esd", 0.6),
    ]
    print("targets (ratios; times vary by about 2% from run to run):")
    for label, key, target in checks:
        verdict = "met" if figures[key] <= target else "missed"
        print(f"  {label:50s} {figures[key]:.3f}  target <= {target:<4}  {verdict}")


def main():
    args = parse_args()
    torch.set_flush_denormal(True)  # denormal floats can slow CPU kernels several times over
    device = "cuda" if args.full else "cpu"
    if args.full and not torch.cuda.is_available():
        raise common.UserError("--full needs a CUDA GPU; run without --full on a CPU")
    dtype = torch.float16 if args.full else torch.float32

    # The hypernetwork widths to time: the one that matches SD 1.4's proportions first, then SD's own.
    if args.hidden_dim is None:
        args.hidden_dim = SD14_HIDDEN_DIM if args.full else matched_hidden_dim(REDUCED_UNET)
    hidden_dims = list(dict.fromkeys([args.hidden_dim, SD14_HIDDEN_DIM]))

    if args.memory_probe:
        memory_probe(args, args.memory_probe, device, dtype)
        return

    figures = {
        "device": torch.cuda.get_device_name() if args.full else "cpu",
        "threads": torch.get_num_threads(),
        "hidden_dims": hidden_dims,
    }
    sections = [
        ("training update", lambda: training_figures(args, device, dtype, hidden_dims)),
        ("training update, Flux", lambda: flux_training_figures(args, device, torch.bfloat16 if args.full else dtype)),
        ("sampling one image", lambda: sampling_figures(args, device, dtype)),
        ("erase concepts", lambda: concept_scaling_figures(args, device, dtype)),
        ("peak memory", lambda: memory_figures(args, hidden_dims)),
    ]
    for title, measure in sections:
        results = measure()
        print(f"{title}:")
        for name, value in results.items():
            print(f"  {name:40s} {value:.4g}" if isinstance(value, float) else f"  {name:40s} {value}")
        figures.update(results)
    print_targets(figures, hidden_dims[0])

    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
