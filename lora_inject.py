"""Low-rank adapters whose factors are handed in per sample, for a frozen UNet or Flux transformer.

A classic LoRA stores its factors as parameters of the layer. Here the factors come from a
hypernetwork that reads the prompt, so each sample of a batch may carry its own pair:

    y = x @ W.T + bias + (alpha / rank) * (x @ lora_A.T) @ lora_B.T

with lora_A: (batch, rank, in) and lora_B: (batch, out, rank). The base weight W is never modified,
so removing the adapters, or handing in no factors, gives the original model back bit for bit.

Usage:

    layers = inject_lora(unet, target="xattn", rank=4, alpha=4.0)
    set_lora_factors(layers, factors)          # {layer name: (lora_A, lora_B)}
    eps = unet(x_t, timesteps, prompt_embeds).sample
    clear_lora_factors(layers)                 # back to the frozen model
    remove_lora(unet)
"""

import re

import torch
import torch.nn.functional as F
from torch import nn


# Each target set is a regular expression over module names, so the choice of layers can be read at a
# glance and checked against `model.named_modules()`. Stable Diffusion UNets name self-attention
# `attn1` and cross-attention `attn2` in every transformer block.
TARGET_SETS = {
    "sd": {
        # Cross-attention keys and values: the only layers that see the text. The ESD-x choice,
        # best for styles, objects and celebrities.
        "xattn": r".*\.attn2\.(to_k|to_v)",
        # Queries, keys, values and outputs of self- and cross-attention.
        "attn": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        # Everything in attention but cross-attention: the ESD-u choice, best for nudity, which is
        # spread over the whole image rather than tied to one word.
        "noxattn": r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    },
    "flux": {
        # Value and output projections of every attention, image and text streams. Single-stream
        # blocks have no output projection of their own (their `proj_out` mixes attention and MLP),
        # so only their `to_v` is targeted.
        "vo": r".*\.attn\.(to_v|to_out\.0|add_v_proj|to_add_out)",
        "attn": r".*\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        # The text stream of the double-stream blocks only.
        "context": r".*\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    },
}


def model_family(model):
    """Return "flux" for a Flux transformer and "sd" for a Stable Diffusion UNet."""
    name = type(model).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("UNet2DCondition"):
        return "sd"
    raise ValueError(f"unsupported model class {name}: expected UNet2DConditionModel or FluxTransformer2DModel")


def find_target_layers(model, target):
    """Return {name: nn.Linear} for the layers of a target set, in module order.

    An unknown target set or one that matches no layer is an error, because training a LoRA on
    nothing would silently leave the model unchanged.
    """
    family = model_family(model)
    if target not in TARGET_SETS[family]:
        valid = ", ".join(TARGET_SETS[family])
        raise ValueError(f"unknown target set {target!r} for a {family} model; valid: {valid}")

    pattern = re.compile(TARGET_SETS[family][target])
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module = module.base
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            layers[name] = module
    if not layers:
        raise ValueError(f"target set {target!r} matched no nn.Linear layer in {type(model).__name__}")
    return layers


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update whose factors are set from outside before a forward."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.lora_A = None  # (batch or 1, rank, in)
        self.lora_B = None  # (batch or 1, out, rank)
        self._merged = None  # (lora_A, lora_B, W + scale * B A) for the last single set of factors

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def merged_weight(self):
        """Return W + scale * B A for the one set of factors that is set, computing it once per set.

        The merged weights are a second copy of the adapted layers until the factors are cleared: by
        arithmetic, 38 MB for SD 1.4's `xattn` set and 2.2 GB for FLUX.1-dev's `vo` set in 16 bits.
        """
        if self._merged is None or self._merged[0] is not self.lora_A or self._merged[1] is not self.lora_B:
            # (out, rank) @ (rank, in) -> (out, in), summed in fp32 and stored in the weight's dtype.
            delta = self.lora_B[0].float() @ self.lora_A[0].float()
            weight = (self.base.weight.float() + self.scale * delta).to(self.base.weight.dtype)
            self._merged = (self.lora_A, self.lora_B, weight)
        return self._merged[2]

    def forward(self, x):
        if self.lora_A is None:
            return self.base(x)

        # At inference with one set of factors for the whole batch (one prompt and its guidance copy),
        # the LoRA folds into the weight once, so every later step costs what the plain layer costs.
        if self.lora_A.shape[0] == 1 and not torch.is_grad_enabled():
            return F.linear(x, self.merged_weight(), self.base.bias)

        y = self.base(x)

        # x: (batch, ..., in). The factors carry one set per sample, or one set for the whole batch.
        # Under classifier-free guidance the pipeline stacks [uncond, cond] along the batch, so a
        # factor batch that divides the input batch is tiled to cover every copy.
        lora_A, lora_B = self.lora_A, self.lora_B
        batch = x.shape[0]
        if lora_A.shape[0] != batch and lora_A.shape[0] != 1:
            copies, remainder = divmod(batch, lora_A.shape[0])
            if remainder:
                raise ValueError(
                    f"LoRA factors for {lora_A.shape[0]} samples cannot cover an input batch of {batch}"
                )
            lora_A = lora_A.repeat(copies, 1, 1)
            lora_B = lora_B.repeat(copies, 1, 1)

        # (batch, tokens, in) -> (batch, tokens, rank) -> (batch, tokens, out)
        tokens = x.reshape(batch, -1, x.shape[-1])
        hidden = torch.matmul(tokens, lora_A.to(x.dtype).transpose(1, 2))
        update = torch.matmul(hidden, lora_B.to(x.dtype).transpose(1, 2))
        return y + self.scale * update.reshape(y.shape)


def inject_lora(model, target, rank, alpha):
    """Wrap every layer of a target set in a LoRALinear, and return {name: LoRALinear}.

    The base model's parameters are frozen, since only the hypernetwork that writes the factors
    is trained. Injecting twice is an error rather than a stack of adapters.
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise RuntimeError("this model already has LoRA layers; call remove_lora(model) first")

    model.requires_grad_(False)
    injected = {}
    for name, linear in find_target_layers(model, target).items():
        wrapped = LoRALinear(linear, rank, alpha)
        _replace_module(model, name, wrapped)
        injected[name] = wrapped
    return injected


def remove_lora(model):
    """Put the original nn.Linear layers back, leaving the model exactly as before injection."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace_module(model, name, module.base)


def _replace_module(model, name, new_module):
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if child_name.isdigit():
        parent[int(child_name)] = new_module  # an entry of an nn.ModuleList, such as to_out.0
    else:
        setattr(parent, child_name, new_module)


def set_lora_factors(layers, factors):
    """Hand each LoRA layer its (lora_A, lora_B) for the next forward passes."""
    missing = layers.keys() - factors.keys()
    if missing:
        raise KeyError(f"no LoRA factors for {len(missing)} layers, e.g. {sorted(missing)[0]}")
    for name, layer in layers.items():
        lora_A, lora_B = factors[name]
        layer.lora_A, layer.lora_B = lora_A, lora_B


def clear_lora_factors(layers):
    """Turn every adapter off, so the model computes exactly the frozen base prediction."""
    for layer in layers.values():
        layer.lora_A, layer.lora_B, layer._merged = None, None, None


class lora_disabled:
    """Context manager that runs the frozen base model and then restores the factors that were set."""

    def __init__(self, layers):
        self.layers = layers
        self.saved = {}

    def __enter__(self):
        self.saved = {name: (layer.lora_A, layer.lora_B) for name, layer in self.layers.items()}
        clear_lora_factors(self.layers)

    def __exit__(self, *exc_info):
        for name, layer in self.layers.items():
            layer.lora_A, layer.lora_B = self.saved[name]
        return False


def layer_shapes(layers):
    """Return {name: (out_features, in_features)}: what a checkpoint records to check a model fits."""
    return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}


def lora_delta_norm_squared(factors, scale):
    """Return the squared Frobenius norm of all dW = scale * B @ A together, per sample: (batch,).

    ||B A||_F^2 = sum((B^T B) * (A A^T)) uses only rank x rank products, so it stays cheap for
    large layers. Penalise this rather than lora_delta_norm(...) ** 2, because the square root has
    an infinite gradient at dW = 0, where every LoRA starts, and would turn the first update into NaN.
    """
    total = 0.0
    for lora_A, lora_B in factors.values():
        gram_B = lora_B.transpose(1, 2) @ lora_B  # (batch, rank, rank)
        gram_A = lora_A @ lora_A.transpose(1, 2)  # (batch, rank, rank)
        total = total + (gram_B * gram_A).sum(dim=(1, 2)).clamp_min(0)
    return scale**2 * total


def lora_delta_norm(factors, scale):
    """Return the Frobenius norm of all dW = scale * B @ A together, per sample: (batch,)."""
    return torch.sqrt(lora_delta_norm_squared(factors, scale))
