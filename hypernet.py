"""The hypernetwork that writes a LoRA for every targeted layer from the prompt's CLIP embedding.

H(e, s) reads the L2-normalised pooled text embedding e of a prompt and a step s in [0, S] along the
LoRA's training trajectory, and returns (lora_A, lora_B) for each layer. Two properties carry the
method:

  * B = (s / S) * B_head(...), so dW(e, 0) = 0 for every prompt: the trajectory starts at the
    unchanged model. At inference the LoRA is H(e, S).
  * Layers of equal shape share one output head and are distinguished by a learned layer embedding,
    so the network grows with the number of distinct shapes, not with the number of layers.

StaticLoRA is the classic alternative: one learned LoRA for every prompt, with the same interface,
so the two can be trained and compared with everything else equal.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def step_features(s, trajectory_steps, num_features):
    """Encode trajectory steps as sinusoids of s / S, the way diffusion models encode timesteps.

    s: (batch,) -> (batch, num_features)
    """
    position = s.float() / trajectory_steps
    half = num_features // 2
    frequencies = math.pi * torch.arange(1, half + 1, device=s.device, dtype=torch.float32)
    angles = position[:, None] * frequencies[None, :]  # (batch, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def group_layers_by_shape(layer_shapes):
    """Return [((out, in), [layer names])] in the order each shape first appears."""
    groups = {}
    for name, shape in layer_shapes.items():
        groups.setdefault(tuple(shape), []).append(name)
    return list(groups.items())


def init_lora_A(num_layers, rank, in_features, generator=None):
    """Draw lora_A like a freshly initialised LoRA, so the first gradients on lora_B are well scaled."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(num_layers, rank, in_features, generator=generator) * 2 - 1) * bound


class ShapeGroupHead(nn.Module):
    """Writes (lora_A, lora_B) for all layers of one (out, in) shape from the shared trunk features."""

    def __init__(self, num_layers, out_features, in_features, rank, hidden_dim):
        super().__init__()
        self.num_layers = num_layers
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank

        self.layer_embedding = nn.Parameter(torch.randn(num_layers, hidden_dim) * 0.02)
        self.mix = nn.Linear(hidden_dim, hidden_dim)
        self.head_A = nn.Linear(hidden_dim, rank * in_features)
        self.head_B = nn.Linear(hidden_dim, out_features * rank)
        self.base_A = nn.Parameter(init_lora_A(num_layers, rank, in_features))

        # Both heads start at zero: A begins as a plain LoRA initialisation shared by all prompts,
        # and B begins at zero, so the untrained hypernetwork leaves the model unchanged.
        for head in (self.head_A, self.head_B):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, trunk_features, step_scale):
        batch = trunk_features.shape[0]

        # (batch, hidden) -> (batch, layers, hidden): one feature vector per layer of this shape.
        per_layer = F.silu(self.mix(trunk_features)[:, None, :] + self.layer_embedding[None, :, :])

        # (batch, layers, rank * in) -> (batch, layers, rank, in)
        delta_A = self.head_A(per_layer).view(batch, self.num_layers, self.rank, self.in_features)
        lora_A = self.base_A[None] + delta_A

        # (batch, layers, out * rank) -> (batch, layers, out, rank), scaled by s / S so that B(s=0) = 0.
        lora_B = self.head_B(per_layer).view(batch, self.num_layers, self.out_features, self.rank)
        lora_B = step_scale[:, None, None, None] * lora_B
        return lora_A, lora_B


class HyperNetwork(nn.Module):
    """H(e, s) -> {layer name: (lora_A (batch, rank, in), lora_B (batch, out, rank))}."""

    kind = "hypernet"

    def __init__(self, layer_shapes, embed_dim, rank, hidden_dim=512, trajectory_steps=300, num_step_features=32,
                 prompt_gate=True):
        super().__init__()
        self.config = dict(
            kind=self.kind,
            layer_shapes={name: list(shape) for name, shape in layer_shapes.items()},
            embed_dim=embed_dim,
            rank=rank,
            hidden_dim=hidden_dim,
            trajectory_steps=trajectory_steps,
            num_step_features=num_step_features,
            prompt_gate=prompt_gate,
        )
        self.trajectory_steps = trajectory_steps
        self.num_step_features = num_step_features

        self.trunk = nn.Sequential(
            nn.Linear(embed_dim + num_step_features, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
        )

        # The prompt gate g(e) in (0, 1) scales every B of a prompt: one number per prompt that retention
        # can drive to zero, so "stay silent" need not be learned separately by every head.
        self.gate = None
        if prompt_gate:
            self.gate = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))

        self.groups = group_layers_by_shape(layer_shapes)
        self.heads = nn.ModuleList(
            ShapeGroupHead(len(names), out_features, in_features, rank, hidden_dim)
            for (out_features, in_features), names in self.groups
        )

    def forward(self, pooled_prompt_embeds, s):
        """pooled_prompt_embeds: (batch, embed_dim); s: (batch,) integer steps, or one int for all."""
        batch = pooled_prompt_embeds.shape[0]
        device = pooled_prompt_embeds.device
        if not torch.is_tensor(s) or s.ndim == 0:
            s = torch.full((batch,), int(s))
        s = s.to(device)

        e = F.normalize(pooled_prompt_embeds.float(), dim=-1)
        features = torch.cat([e, step_features(s, self.trajectory_steps, self.num_step_features)], dim=-1)
        trunk_features = self.trunk(features)  # (batch, hidden)
        step_scale = s.float() / self.trajectory_steps  # (batch,)
        if self.gate is not None:
            step_scale = step_scale * torch.sigmoid(self.gate(e)).squeeze(-1)

        factors = {}
        for ((_, _), names), head in zip(self.groups, self.heads):
            lora_A, lora_B = head(trunk_features, step_scale)
            for index, name in enumerate(names):
                factors[name] = (lora_A[:, index], lora_B[:, index])
        return factors


class StaticLoRA(nn.Module):
    """One learned LoRA for every prompt: the classic LoRA fine-tune behind the H(e, s) interface.

    lora_A starts as in a standard LoRA and lora_B at zero, so training starts at the unchanged model.
    The prompt embedding and the step are accepted and ignored.
    """

    kind = "static"

    def __init__(self, layer_shapes, rank):
        super().__init__()
        self.config = dict(
            kind=self.kind,
            layer_shapes={name: list(shape) for name, shape in layer_shapes.items()},
            rank=rank,
        )
        self.names = list(layer_shapes)
        self.lora_A = nn.ParameterList(
            nn.Parameter(init_lora_A(1, rank, in_features)[0]) for _, in_features in layer_shapes.values()
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(out_features, rank)) for out_features, _ in layer_shapes.values()
        )

    def forward(self, pooled_prompt_embeds, s=None):
        batch = pooled_prompt_embeds.shape[0]
        return {
            name: (lora_A.expand(batch, -1, -1), lora_B.expand(batch, -1, -1))
            for name, lora_A, lora_B in zip(self.names, self.lora_A, self.lora_B)
        }


def build_from_config(config):
    """Rebuild a HyperNetwork or StaticLoRA from the plain dictionary stored in a checkpoint."""
    layer_shapes = {name: tuple(shape) for name, shape in config["layer_shapes"].items()}
    if config["kind"] == "static":
        return StaticLoRA(layer_shapes, config["rank"])
    if config["kind"] == "hypernet":
        return HyperNetwork(
            layer_shapes,
            embed_dim=config["embed_dim"],
            rank=config["rank"],
            hidden_dim=config["hidden_dim"],
            trajectory_steps=config["trajectory_steps"],
            num_step_features=config["num_step_features"],
            prompt_gate=config.get("prompt_gate", False),
        )
    raise ValueError(f"unknown network kind {config['kind']!r}; valid: hypernet, static")


def count_parameters(module):
    return sum(parameter.numel() for parameter in module.parameters())
