"""The erase/retain objectives and the training loop shared by train_sd.py and train_flux.py.

A model family plugs in through a small denoiser object with two methods:

    denoiser.predict(x_t, timesteps, cond)          -> eps (SD) or velocity (Flux), LoRA as set
    denoiser.sample_x_t(cond, uncond, stop, gen)    -> (x_t, timesteps), sampled without gradients

where `cond` is a dict of batched conditioning tensors (prompt_embeds, and for Flux the pooled
embeddings too). Everything else, from the negative-guidance target to checkpoints, lives here once.

Task loss for an erase prompt p with anchor a (ESD's negative guidance, eta = --negative-guidance):

    target = eps_base(x_t, t, a) - eta * (eps_base(x_t, t, p) - eps_base(x_t, t, a))
    L_task(theta) = || eps_{base + dW(theta)}(x_t, t, p) - target ||^2
"""

import contextlib
import math
import random
import time

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from tqdm import tqdm

from common import (
    UserError,
    clean_concept,
    fill_template,
    load_checkpoint,
    mentions,
    read_concepts_file,
    read_lines,
    save_checkpoint,
)
from hypernet import HyperNetwork, StaticLoRA, count_parameters
from lora_inject import clear_lora_factors, layer_shapes, lora_delta_norm, lora_delta_norm_squared, set_lora_factors

# In `fields`, a quarter of the trajectory segments start at s = 0, where H(e, 0) is exactly the base
# model, so the start of the trajectory stays anchored while the rest of it is learned.
START_AT_ZERO_PROBABILITY = 0.25
# The inner learning rate is calibrated on this many erase prompts at s = 0.
CALIBRATION_PROMPTS = 8


def cond_rows(cond, index):
    """Select rows of every conditioning tensor: {name: (n, ...)} -> {name: (len(index), ...)}."""
    return {name: tensor[index] for name, tensor in cond.items()}


def cat_conds(*conds):
    return {name: torch.cat([cond[name] for cond in conds]) for name in conds[0]}


def per_sample_mse(prediction, target):
    """(batch, ...) x2 -> (batch,): the mean squared error of each sample, computed in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def squared_distance(factors, targets):
    """Sum of squared differences between two factor sets, averaged over the batch."""
    total = 0.0
    for name, (lora_A, lora_B) in factors.items():
        target_A, target_B = targets[name]
        total = total + (lora_A - target_A).pow(2).sum() + (lora_B - target_B).pow(2).sum()
    batch = next(iter(factors.values()))[0].shape[0]
    return total / batch


def detach_factors(factors, requires_grad=False):
    return {
        name: (lora_A.detach().clone().requires_grad_(requires_grad), lora_B.detach().clone().requires_grad_(requires_grad))
        for name, (lora_A, lora_B) in factors.items()
    }


class ErasureTrainer:
    """Holds the frozen model, the network that writes its LoRA and the prompt tables for one run."""

    def __init__(self, args, denoiser, layers, network, prompts, device, autocast_dtype):
        self.args = args
        self.denoiser = denoiser
        self.layers = layers
        self.network = network
        self.prompts = prompts  # erase_cond, anchor_cond, retain_cond, uncond, erase_pooled, retain_pooled
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.scale = args.alpha / args.rank
        self.steps_S = getattr(network, "trajectory_steps", 0)
        self.xt_cache = {}  # kind -> [(x_t, timestep, prompt index)]

    def autocast(self):
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32)

    # ------------------------------------------------------------------------------------------------
    # Building blocks

    def sample_x_t(self, cond, factors, generator):
        """Sample x_t the way ESD does: denoise from noise with the LoRA-equipped model to a random step."""
        stop = int(torch.randint(0, self.args.sampling_steps, (1,), generator=generator))
        set_lora_factors(self.layers, detach_factors(factors))
        with self.autocast():
            x_t, timesteps = self.denoiser.sample_x_t(cond, self.prompts["uncond"], stop, generator)
        clear_lora_factors(self.layers)
        return x_t.float(), timesteps

    def draw_x_t(self, kind, index, factors_for, generator):
        """x_t for the `kind` ("erase" or "retain") prompts `index`, fresh or partly from the cache.

        With --xt-cache, a quarter of the batch is sampled afresh and the rest is drawn from the
        latest x_t of the same kind. Cached x_t were sampled with an earlier state of the network: a
        cheap approximation of ESD's sampling with the current one. Returns (x_t, timesteps, index),
        where index names the prompt each row was sampled for.
        """
        cond = self.prompts[f"{kind}_cond"]
        if self.args.xt_cache <= 0:
            x_t, timesteps = self.sample_x_t(cond_rows(cond, index), factors_for(index), generator)
            return x_t, timesteps, index

        fresh = max(1, len(index) // 4)
        x_t, timesteps = self.sample_x_t(cond_rows(cond, index[:fresh]), factors_for(index[:fresh]), generator)
        cache = self.xt_cache.setdefault(kind, [])
        for row in range(fresh):
            cache.append((x_t[row], timesteps[row], int(index[row])))
        del cache[:-self.args.xt_cache]

        picks = [random.randrange(len(cache)) for _ in range(len(index) - fresh)]
        x_t = torch.cat([x_t] + [cache[i][0][None] for i in picks])
        timesteps = torch.cat([timesteps] + [cache[i][1][None] for i in picks])
        index = torch.cat([index[:fresh], torch.tensor([cache[i][2] for i in picks], dtype=torch.long)])
        return x_t, timesteps, index

    @torch.no_grad()
    def negative_guidance_target(self, x_t, timesteps, index):
        """target = eps_a - eta * (eps_p - eps_a), both from the frozen model (LoRA off)."""
        clear_lora_factors(self.layers)
        with self.autocast():
            eps_anchor = self.denoiser.predict(x_t, timesteps, cond_rows(self.prompts["anchor_cond"], index)).float()
            eps_concept = self.denoiser.predict(x_t, timesteps, cond_rows(self.prompts["erase_cond"], index)).float()
        return eps_anchor - self.args.negative_guidance * (eps_concept - eps_anchor)

    def task_loss(self, factors, x_t, timesteps, index, target):
        """(batch,) L_task with the given LoRA on the erase prompts."""
        set_lora_factors(self.layers, factors)
        with self.autocast():
            prediction = self.denoiser.predict(x_t, timesteps, cond_rows(self.prompts["erase_cond"], index))
        clear_lora_factors(self.layers)
        return per_sample_mse(prediction, target)

    def erase_batch(self, generator, factors_for):
        """Draw erase prompts, their x_t and their negative-guidance targets.

        factors_for(index) gives the LoRA to sample x_t with. Rows drawn from the x_t cache belong to
        the prompts they were sampled for, so the returned index is the one to use afterwards.
        """
        index = torch.randint(0, len(self.prompts["erase_pooled"]), (self.args.batch_size,), generator=generator)
        x_t, timesteps, index = self.draw_x_t("erase", index, factors_for, generator)
        target = self.negative_guidance_target(x_t, timesteps, index)
        return index, x_t, timesteps, target

    # ------------------------------------------------------------------------------------------------
    # Objectives: each returns (loss, {name: value to log})

    def fields_loss(self, generator):
        """Regress H(e, s + K) onto K plain gradient steps on L_task taken from H(e, s)."""
        args, S = self.args, self.steps_S
        batch = args.batch_size

        # A trajectory segment per erase prompt: jump length K in [1, max_jump] and start s in [0, S - K].
        jumps = torch.randint(1, args.max_jump + 1, (batch,), generator=generator)
        starts = (torch.rand(batch, generator=generator) * (S - jumps + 1)).long()
        starts[torch.rand(batch, generator=generator) < START_AT_ZERO_PROBABILITY] = 0

        pooled = self.prompts["erase_pooled"]
        starts_on_device = starts.to(self.device)

        def factors_at_start(index):
            with torch.no_grad():
                return self.network(pooled[index], starts_on_device[:len(index)])

        index, x_t, timesteps, target = self.erase_batch(generator, factors_at_start)
        theta = detach_factors(factors_at_start(index), requires_grad=True)

        # K plain gradient steps from theta_s, each clipped to --inner-step-norm per sample.
        loss_start = None
        for inner_step in range(int(jumps.max())):
            losses = self.task_loss(theta, x_t, timesteps, index, target)
            if loss_start is None:
                loss_start = losses.detach()
            leaves = [tensor for pair in theta.values() for tensor in pair]
            grads = torch.autograd.grad(losses.sum(), leaves)
            norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(dim=1) for g in grads))  # (batch,)
            step_size = args.inner_lr * torch.clamp(args.inner_step_norm / (args.inner_lr * norms + 1e-12), max=1.0)
            step_size = step_size * (inner_step < jumps).float().to(self.device)  # a sample stops after K steps
            with torch.no_grad():
                for leaf, grad in zip(leaves, grads):
                    leaf -= step_size.view(-1, *[1] * (grad.ndim - 1)) * grad

        # Removal: H(e, s + K) regresses onto the end of the segment, held fixed.
        predicted = self.network(pooled[index], (starts + jumps).to(self.device))
        removal = squared_distance(predicted, detach_factors(theta))

        # Retention: for a retain prompt and a random s, H(e_r, s) is pulled onto H(e_r, 0). The distance
        # is measured on the weight update, ||dW(e_r, s) - dW(e_r, 0)||^2 = ||dW(e_r, s)||^2 since
        # dW(e_r, 0) = 0: a distance on the factors would also penalise A, which changes nothing while
        # B is zero, and would weigh B by nothing but its element count.
        retain_index = torch.randint(0, len(self.prompts["retain_pooled"]), (batch,), generator=generator)
        retain_pooled = self.prompts["retain_pooled"][retain_index]
        retain_steps = torch.randint(1, S + 1, (batch,), generator=generator).to(self.device)
        retain_factors = self.network(retain_pooled, retain_steps)
        retention = lora_delta_norm_squared(retain_factors, self.scale).mean()

        loss = removal + args.retain_weight * retention
        return loss, {"task": loss_start.mean().item(), "removal": removal.item(), "retention": retention.item()}

    def direct_loss(self, generator):
        """Back-propagate L_task through the LoRA at s = S, with output matching on retain prompts."""
        args, S = self.args, self.steps_S
        pooled = self.prompts["erase_pooled"]
        index, x_t, timesteps, target = self.erase_batch(generator, lambda index: self.network(pooled[index], S))
        task = self.task_loss(self.network(pooled[index], S), x_t, timesteps, index, target).mean()

        # Retention: the LoRA-equipped prediction on a retain prompt should match the frozen one, and
        # the LoRA written for it should be small: ||dW(e_r)||^2 weighted by --norm-weight.
        retain_pooled = self.prompts["retain_pooled"]
        retain_index = torch.randint(0, len(retain_pooled), (args.batch_size,), generator=generator)
        with torch.no_grad():
            x_r, t_r, retain_index = self.draw_x_t("retain", retain_index, lambda i: self.network(retain_pooled[i], S), generator)
        retain_cond = cond_rows(self.prompts["retain_cond"], retain_index)
        retain_factors = self.network(retain_pooled[retain_index], S)
        with torch.no_grad(), self.autocast():
            eps_base = self.denoiser.predict(x_r, t_r, retain_cond).float()
        set_lora_factors(self.layers, retain_factors)
        with self.autocast():
            eps_lora = self.denoiser.predict(x_r, t_r, retain_cond)
        clear_lora_factors(self.layers)
        output_match = per_sample_mse(eps_lora, eps_base).mean()
        norm_penalty = lora_delta_norm_squared(retain_factors, self.scale).mean()

        retention = output_match + args.norm_weight * norm_penalty
        loss = task + args.retain_weight * retention
        return loss, {"task": task.item(), "output_match": output_match.item(), "retain_norm": norm_penalty.sqrt().item()}

    # ------------------------------------------------------------------------------------------------
    # Inner learning rate for `fields`

    def calibrate_inner_lr(self, generator):
        """Choose lr_inner so that a first gradient step from s = 0 has norm --inner-step-norm.

        The useful size of a plain gradient step on the LoRA factors depends on the model's gradient
        scale, which differs by orders of magnitude between models, so a fixed value does not carry over.
        """
        pooled = self.prompts["erase_pooled"]
        count = min(CALIBRATION_PROMPTS, len(pooled))
        all_index = torch.randperm(len(pooled), generator=generator)[:count]

        # Chunks of --batch-size keep the memory of this pass at that of a training step.
        norms = []
        for index in all_index.split(self.args.batch_size):
            with torch.no_grad():
                theta = detach_factors(self.network(pooled[index], 0), requires_grad=True)
            x_t, timesteps = self.sample_x_t(cond_rows(self.prompts["erase_cond"], index), theta, generator)
            target = self.negative_guidance_target(x_t, timesteps, index)
            losses = self.task_loss(theta, x_t, timesteps, index, target)
            leaves = [tensor for pair in theta.values() for tensor in pair]
            grads = torch.autograd.grad(losses.sum(), leaves)
            norms.append(torch.sqrt(sum(g.pow(2).flatten(1).sum(dim=1) for g in grads)))
        median_norm = torch.cat(norms).median().item()
        if not math.isfinite(median_norm) or median_norm <= 0:
            raise UserError(f"cannot calibrate --inner-lr: the task loss gradient norm is {median_norm}; pass --inner-lr")
        return self.args.inner_step_norm / median_norm, median_norm

    @torch.no_grad()
    def lora_strengths(self):
        """Mean ||dW|| at s = S over all erase prompts and over all retain prompts."""
        S = self.steps_S
        erase = lora_delta_norm(self.network(self.prompts["erase_pooled"], S), self.scale).mean().item()
        retain = lora_delta_norm(self.network(self.prompts["retain_pooled"], S), self.scale).mean().item()
        return erase, retain


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing with LoRA factors that are set from outside the model

def lora_checkpoint_function(layers):
    """Return a gradient checkpointing function that recomputes each block with its forward pass's LoRA.

    The trainer sets LoRA factors before a forward pass and clears them before the backward pass, so
    diffusers' default checkpointing would recompute the blocks with no LoRA at all: a CheckpointError
    or wrong gradients. Pass the result to `model.enable_gradient_checkpointing(...)`.
    """
    def checkpoint(module, *args):
        forward_factors = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}

        @contextlib.contextmanager
        def recompute_with_forward_factors():
            current = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
            set_lora_factors(layers, forward_factors)
            try:
                yield
            finally:
                set_lora_factors(layers, current)

        # context_fn returns (context of the forward pass, context of the recomputation).
        return torch.utils.checkpoint.checkpoint(
            module.__call__,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), recompute_with_forward_factors()),
        )

    return checkpoint


def peak_memory_gib(device):
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident set (Linux only)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # the file reports KiB
    except OSError:
        pass
    return float("nan")


def cosine_schedule(optimizer, total_steps, warmup_steps):
    """Linear warm-up, then cosine decay to zero over the run."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(parameters, lr):
    """Return AdamW with its fused kernel: one pass over all tensors instead of a Python loop over them.

    For a hypernetwork of millions of parameters the optimizer step is a large part of its cost on top
    of the frozen model. In the CPU runs of `benchmarks/bench.py`, which times this same optimizer, the
    fused step was 3 to 5 times faster than the looped one.
    """
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)


def train(trainer, config, resume_path=None):
    """Run the optimisation loop, saving resumable checkpoints, and return the final step."""
    args, network, device = trainer.args, trainer.network, trainer.device
    generator = torch.Generator().manual_seed(args.seed)
    random.seed(args.seed)

    # Only the network's parameters are trained; they stay in fp32 whatever the model's dtype.
    parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(parameters, args.lr)
    lr_scheduler = cosine_schedule(optimizer, args.steps, warmup_steps=min(50, args.steps // 10))
    scaler = torch.amp.GradScaler("cuda", enabled=trainer.autocast_dtype == torch.float16)

    step = 0
    if resume_path:
        checkpoint = load_checkpoint(resume_path)
        if checkpoint["config"]["network"] != network.config:
            raise UserError(f"cannot resume from {resume_path}: it contains a network with a different configuration; use the options it was trained with")
        network.load_state_dict(checkpoint["network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if checkpoint["scaler"] is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint["step"]
        if step >= args.steps:
            raise UserError(f"{resume_path} is already at step {step}; pass --steps above {step} to train further")
        generator.manual_seed(args.seed + step)
        print(f"resumed from {resume_path} at step {step}")

    objective = trainer.direct_loss if args.static or args.objective == "direct" else trainer.fields_loss

    def save(at_step):
        config["step"] = at_step
        save_checkpoint(args.out, network, config, at_step, optimizer, scaler, lr_scheduler)

    progress = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    # Steps whose optimizer update is applied: what an interrupted run saves, so a resumed run
    # neither repeats nor skips a step.
    completed = step
    try:
        for step in progress:
            network.train()
            loss, terms = objective(generator)
            if not torch.isfinite(loss):
                raise UserError(
                    f"loss is {loss.item()} at step {step}; nothing was saved over {args.out}. "
                    "Lower --lr or --inner-step-norm, or train in --dtype fp32"
                )

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            completed = step + 1

            progress.set_postfix({name: f"{value:.4g}" for name, value in terms.items()})
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                erase_norm, retain_norm = trainer.lora_strengths()
                rate = (done - progress.initial) / (time.perf_counter() - started)
                memory = peak_memory_gib(device)
                line = " ".join(f"{name} {value:.4g}" for name, value in terms.items())
                tqdm.write(
                    f"step {done}: {line} | |dW| erase {erase_norm:.3g} retain {retain_norm:.3g} | "
                    f"grad {grad_norm:.3g} lr {lr_scheduler.get_last_lr()[0]:.3g} | {rate:.2f} it/s | peak {memory:.2f} GiB"
                )
            if done % args.save_every == 0 and done < args.steps:
                save(done)
    except KeyboardInterrupt:
        progress.close()
        # The checkpoint contains every step whose optimizer update finished, so an interrupted step is lost.
        save(completed)
        print(f"\ninterrupted: saved step {completed} to {args.out}; continue with --resume {args.out}")
        raise SystemExit(130)
    progress.close()
    save(args.steps)
    return args.steps


def run_training(erasure, family, denoiser_model, concepts, erase_prompts, retain_prompts):
    """Calibrate --inner-lr if it is "auto", print the banner, train, and print the final LoRA strengths.

    These steps are the same for every model family once its ErasureTrainer is built.
    """
    args = erasure.args
    if args.objective == "fields" and not args.static and args.inner_lr == "auto":
        args.inner_lr, grad_norm = erasure.calibrate_inner_lr(torch.Generator().manual_seed(args.seed))
        print(f"calibrated --inner-lr {args.inner_lr:.4g} (median task-loss gradient norm {grad_norm:.3g} at s = 0)")

    print_banner(args, erasure.network, denoiser_model, erase_prompts, retain_prompts)
    config = make_config(args, family, erasure.network, concepts, retain_prompts, erase_prompts)
    train(erasure, config, args.resume)

    erase_norm, retain_norm = erasure.lora_strengths()
    print(f"saved {args.out}: mean |dW| {erase_norm:.3g} on erase prompts, {retain_norm:.3g} on retain prompts")


# ----------------------------------------------------------------------------------------------------
# Command line, prompts, network and configuration shared by the training scripts

def add_training_arguments(parser, default_model, default_target, targets, default_hidden_dim):
    """Add the options that mean the same thing for every model family."""
    add = parser.add_argument
    add("--model", default=default_model, help="hub id or local diffusers folder; 'toy' is the shipped toy model")
    add("--concept", action="append", default=[], help="concept to erase; repeat the option for several")
    add("--anchor", action="append", default=[],
        help="prompt text a concept is steered towards, e.g. 'a man' for a celebrity: one for all concepts "
             "or one per --concept, in order (default: the empty prompt)")
    add("--concepts-file", help="CSV with a 'concept' column and an optional 'anchor' column")
    add("--retain", action="append", default=[], help="prompt whose images must not change; repeatable")
    add("--retain-file", help="text file of prompts to retain, one per line")
    add("--no-builtin-retain", action="store_true", help="use only the given retain prompts, not the built-in set")
    add("--templates-file", help="text file of prompt templates with {} where the concept goes (default: built-in)")
    add("--target", default=default_target, choices=targets, help="which attention layers get a LoRA")
    add("--rank", type=int, default=4, help="LoRA rank")
    add("--alpha", type=float, default=4.0, help="LoRA alpha: dW = (alpha / rank) * B @ A")
    add("--hidden-dim", type=int, default=default_hidden_dim, help="width of the hypernetwork's MLP")
    add("--trajectory-steps", type=int, default=300, help="S: trajectory length; inference uses H(e, S)")
    # direct is the default because it erased best on the toy world (BENCHMARKS.md has the comparison).
    add("--objective", default="direct", choices=["fields", "direct"],
        help="direct: back-propagate the task loss into the hypernetwork; fields: match the trajectory of "
             "gradient descent on the task loss")
    add("--static", action="store_true", help="train one static LoRA for all prompts instead of a hypernetwork")
    add("--inner-lr", default="auto",
        help="fields: lr of the plain gradient steps on the LoRA factors; 'auto' calibrates it at start")
    add("--inner-step-norm", type=float, default=0.3,
        help="fields: max L2 norm of one inner gradient step per prompt, also the calibration target")
    add("--max-jump", type=int, default=10, help="fields: K, the longest trajectory jump per update, in steps")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate of the hypernetwork (cosine decay)")
    add("--max-grad-norm", type=float, default=1.0, help="clip the hypernetwork's gradient to this norm")
    add("--retain-weight", type=float, default=1.0, help="weight of the retention term against removal")
    add("--norm-weight", type=float, default=0.1, help="direct: weight of ||dW||^2 on retain prompts")
    add("--steps", type=int, default=1000, help="optimisation steps")
    add("--batch-size", type=int, default=2, help="erase prompts (and retain prompts) per step")
    add("--negative-guidance", type=float, default=1.0, help="eta in target = eps_a - eta * (eps_p - eps_a)")
    add("--xt-cache", type=int, default=0,
        help="keep this many sampled x_t and sample afresh only a quarter of each batch (0: always sample)")
    add("--dtype", choices=["fp16", "bf16", "fp32"], help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--seed", type=int, default=0, help="random seed")
    add("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    add("--out", default="ckpt.pt", help="checkpoint path, written atomically")
    add("--save-every", type=int, default=100, help="save a resumable checkpoint every this many steps")
    add("--resume", help="continue training from this checkpoint")
    add("--log-every", type=int, default=25, help="print a log line every this many steps")


def parse_args_with_presets(parser, presets):
    """Parse arguments; a model named in `presets` first gets its preset defaults.

    Options given on the command line always win over a preset, and the banner prints the result.
    """
    known, _ = parser.parse_known_args()
    preset = presets.get(known.model, {})
    parser.set_defaults(**preset)
    args = parser.parse_args()
    args.preset = known.model if preset else None
    return args


def validate_args(args):
    """Reject invalid settings with one line each."""
    positive = ["rank", "hidden_dim", "trajectory_steps", "max_jump", "steps", "batch_size", "save_every", "log_every"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.static and args.objective == "fields":
        raise UserError("--static trains one LoRA for all prompts and has no trajectory; use it with --objective direct")
    if args.objective == "fields" and args.max_jump > args.trajectory_steps:
        raise UserError(f"--max-jump {args.max_jump} is longer than --trajectory-steps {args.trajectory_steps}")
    if args.inner_lr != "auto":
        try:
            args.inner_lr = float(args.inner_lr)
        except ValueError:
            raise UserError(f"invalid --inner-lr {args.inner_lr!r}: give a number or 'auto'") from None


def read_concepts(args):
    """Return [(concept, anchor)] from --concept/--anchor and --concepts-file."""
    concepts = [clean_concept(text) for text in args.concept]
    anchors = [" ".join(text.split()) for text in args.anchor]
    if anchors and len(anchors) not in (1, len(concepts)):
        raise UserError(f"got {len(anchors)} --anchor options for {len(concepts)} --concept options; give one anchor "
                        "for all concepts or one per concept")
    if len(anchors) == 1:
        anchors = anchors * len(concepts)
    pairs = list(zip(concepts, anchors or [""] * len(concepts)))
    if args.concepts_file:
        pairs += read_concepts_file(args.concepts_file)
    if not pairs:
        raise UserError("no concept to erase: pass --concept \"van gogh\" or --concepts-file FILE")
    return pairs


def build_prompts(args, concepts, templates_for, builtin_retain):
    """Expand concepts into (erase prompt, anchor prompt) pairs and collect the retain prompts.

    templates_for(concept) returns templates with {} where the concept goes; the anchor prompt is the
    same template filled with the anchor, so only the concept is steered away.
    """
    erase, anchor = [], []
    for concept, concept_anchor in concepts:
        for template in templates_for(concept):
            erase.append(fill_template(template, concept))
            anchor.append(fill_template(template, concept_anchor))

    retain = [] if args.no_builtin_retain else list(builtin_retain)
    retain += args.retain
    if args.retain_file:
        retain += read_lines(args.retain_file, "retain prompts")
    # A retain prompt that names an erased concept would teach the network both to fire and to stay silent.
    retain = [prompt for prompt in dict.fromkeys(retain) if not any(mentions(prompt, c) for c, _ in concepts)]
    if not retain:
        raise UserError("no retain prompts left: pass --retain or --retain-file, or drop --no-builtin-retain")
    return erase, anchor, retain


def build_network(args, layers, embed_dim):
    shapes = layer_shapes(layers)
    if args.static:
        return StaticLoRA(shapes, args.rank)
    return HyperNetwork(shapes, embed_dim, args.rank, args.hidden_dim, args.trajectory_steps)


def make_config(args, family, network, concepts, retain_prompts, erase_prompts):
    """Return the plain dictionary stored in every checkpoint: enough to rebuild and use the network."""
    return {
        "model": args.model,
        "family": family,
        "target": args.target,
        "rank": args.rank,
        "alpha": args.alpha,
        "network": network.config,
        "concepts": [list(pair) for pair in concepts],
        "erase_prompts": erase_prompts,
        "retain_prompts": retain_prompts,
        "args": {name: value for name, value in vars(args).items() if isinstance(value, (str, int, float, bool, list, type(None)))},
        "step": 0,
    }


def print_banner(args, network, denoiser_model, erase_prompts, retain_prompts):
    frozen = sum(parameter.numel() for parameter in denoiser_model.parameters())
    print(f"unhype: {network.kind} with {count_parameters(network):,} trainable parameters "
          f"on {len(network.config['layer_shapes'])} layers; frozen denoiser {frozen:,} parameters")
    print(f"erase prompts: {len(erase_prompts)} (e.g. {erase_prompts[0]!r}); retain prompts: {len(retain_prompts)}")
    if args.preset:
        print(f"defaults for the {args.preset!r} model preset are in use where no option was given")
    settings = {name: value for name, value in vars(args).items() if name not in ("concept", "retain", "anchor")}
    print("configuration: " + ", ".join(f"{name}={value}" for name, value in settings.items()))
