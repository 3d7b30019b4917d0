"""Tests of the per-sample LoRA layers on the real UNet and Flux transformer classes."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import nn

from lora_inject import (
    LoRALinear,
    clear_lora_factors,
    find_target_layers,
    inject_lora,
    lora_delta_norm,
    lora_delta_norm_squared,
    lora_disabled,
    remove_lora,
    set_lora_factors,
)
from tiny_models import CLIP_HIDDEN_SIZE, MAX_TOKENS

RANK = 4
ALPHA = 8.0  # alpha / rank = 2, so a wrong scale cannot hide behind a factor of 1
# Factors of this size change the tiny UNet's output by about 1 while batched and single-sample
# results still agree to 1e-6. With a standard deviation of 1 the activations grow until float32
# rounding differs by 4e-4 between batch sizes.
FACTOR_STD = 0.3

# The transformer blocks of the tiny SD UNet, each with self-attention attn1 and cross-attention attn2.
SD_TRANSFORMER_BLOCKS = (
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
    "mid_block.attentions.0.transformer_blocks.0",
)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
EXPECTED_SD_TARGETS = {
    "xattn": {f"{block}.attn2.{name}" for block in SD_TRANSFORMER_BLOCKS for name in ("to_k", "to_v")},
    "attn": {
        f"{block}.{attention}.{name}"
        for block in SD_TRANSFORMER_BLOCKS
        for attention in ("attn1", "attn2")
        for name in ATTENTION_PROJECTIONS
    },
    "noxattn": {f"{block}.attn1.{name}" for block in SD_TRANSFORMER_BLOCKS for name in ATTENTION_PROJECTIONS},
}

# The tiny Flux transformer has one double-stream block (image and text projections) and one
# single-stream block, whose attention has no output projection of its own.
DOUBLE = "transformer_blocks.0.attn"
SINGLE = "single_transformer_blocks.0.attn"
EXPECTED_FLUX_TARGETS = {
    "vo": {f"{DOUBLE}.{name}" for name in ("to_v", "to_out.0", "add_v_proj", "to_add_out")} | {f"{SINGLE}.to_v"},
    "attn": {
        f"{DOUBLE}.{name}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    | {f"{SINGLE}.{name}" for name in ("to_q", "to_k", "to_v")},
    "context": {f"{DOUBLE}.{name}" for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
}


@pytest.fixture(scope="module")
def loaded_unet(tiny_sd_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()


@pytest.fixture
def unet(loaded_unet):
    return copy.deepcopy(loaded_unet)


@pytest.fixture(scope="module")
def flux_transformer(tiny_flux_dir):
    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer").eval()


def unet_inputs(batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    prompt_embeds = torch.randn(batch, MAX_TOKENS, CLIP_HIDDEN_SIZE, generator=generator)
    return x_t, timesteps, prompt_embeds


@torch.no_grad()
def predict(unet, x_t, timesteps, prompt_embeds):
    return unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample


def random_factors(layers, batch, seed=0, zero_B=False):
    """{name: (lora_A (batch, rank, in), lora_B (batch, out, rank))} drawn with FACTOR_STD."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in layers.items():
        lora_A = FACTOR_STD * torch.randn(batch, RANK, layer.in_features, generator=generator)
        lora_B = FACTOR_STD * torch.randn(batch, layer.out_features, RANK, generator=generator)
        factors[name] = (lora_A, torch.zeros_like(lora_B) if zero_B else lora_B)
    return factors


def rows(factors, index):
    """Select samples of a factor set: index is a list of sample positions."""
    return {name: (lora_A[index], lora_B[index]) for name, (lora_A, lora_B) in factors.items()}


def test_injection_without_factors_identical(unet):
    inputs = unet_inputs(batch=2)
    original = predict(unet, *inputs)

    inject_lora(unet, "attn", RANK, ALPHA)

    assert torch.equal(predict(unet, *inputs), original)


def test_zero_B_factors_identical(unet):
    inputs = unet_inputs(batch=2)
    original = predict(unet, *inputs)
    layers = inject_lora(unet, "attn", RANK, ALPHA)

    set_lora_factors(layers, random_factors(layers, batch=2, zero_B=True))

    assert torch.equal(predict(unet, *inputs), original)


def test_removal_restores_original(unet):
    inputs = unet_inputs(batch=2)
    original = predict(unet, *inputs)
    linears = {name: unet.get_submodule(name) for name in EXPECTED_SD_TARGETS["attn"]}
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    set_lora_factors(layers, random_factors(layers, batch=2))
    assert not torch.allclose(predict(unet, *inputs), original)

    remove_lora(unet)

    assert torch.equal(predict(unet, *inputs), original)
    assert not any(isinstance(module, LoRALinear) for module in unet.modules())
    for name, linear in linears.items():
        assert unet.get_submodule(name) is linear


def test_clear_factors_restores_original(unet):
    inputs = unet_inputs(batch=2)
    original = predict(unet, *inputs)
    layers = inject_lora(unet, "xattn", RANK, ALPHA)
    set_lora_factors(layers, random_factors(layers, batch=2))

    clear_lora_factors(layers)

    assert torch.equal(predict(unet, *inputs), original)


def test_mixed_batch_matches_single_samples(unet):
    x_t, timesteps, prompt_embeds = unet_inputs(batch=3)
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    factors = random_factors(layers, batch=3)

    set_lora_factors(layers, factors)
    batched = predict(unet, x_t, timesteps, prompt_embeds)

    for sample in range(3):
        set_lora_factors(layers, rows(factors, [sample]))
        alone = predict(unet, x_t[[sample]], timesteps[[sample]], prompt_embeds[[sample]])
        assert torch.allclose(batched[[sample]], alone, atol=1e-5), f"sample {sample}"

    # The factors matter, so equal outputs above are not a property of the frozen model alone.
    clear_lora_factors(layers)
    assert not torch.allclose(predict(unet, x_t, timesteps, prompt_embeds), batched, atol=1e-3)


def test_single_factor_set_broadcasts(unet):
    inputs = unet_inputs(batch=3)
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    single_set = random_factors(layers, batch=1)

    set_lora_factors(layers, single_set)
    broadcast = predict(unet, *inputs)
    set_lora_factors(layers, rows(single_set, [0, 0, 0]))
    repeated = predict(unet, *inputs)

    assert torch.allclose(broadcast, repeated, atol=1e-5)


def test_factors_tile_over_guidance_batch(unet):
    # A classifier-free guidance batch for prompts p and q is [uncond p, uncond q, cond p, cond q].
    inputs = unet_inputs(batch=4)
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    factors = random_factors(layers, batch=2)

    set_lora_factors(layers, factors)
    tiled = predict(unet, *inputs)
    set_lora_factors(layers, rows(factors, [0, 1, 0, 1]))
    explicit = predict(unet, *inputs)
    set_lora_factors(layers, rows(factors, [0, 0, 1, 1]))
    interleaved = predict(unet, *inputs)

    assert torch.allclose(tiled, explicit, atol=1e-5)
    assert not torch.allclose(tiled, interleaved, atol=1e-3)


def test_factor_batch_not_dividing_raises(unet):
    layers = inject_lora(unet, "xattn", RANK, ALPHA)
    set_lora_factors(layers, random_factors(layers, batch=3))

    with pytest.raises(ValueError, match="3 samples cannot cover an input batch of 4"):
        predict(unet, *unet_inputs(batch=4))


@pytest.mark.parametrize("target", sorted(EXPECTED_SD_TARGETS))
def test_sd_target_set_layers(unet, target):
    expected = EXPECTED_SD_TARGETS[target]

    assert set(find_target_layers(unet, target)) == expected

    layers = inject_lora(unet, target, RANK, ALPHA)
    assert set(layers) == expected
    wrapped = {name for name, module in unet.named_modules() if isinstance(module, LoRALinear)}
    assert wrapped == expected


@pytest.mark.parametrize("target", sorted(EXPECTED_FLUX_TARGETS))
def test_flux_target_set_layers(flux_transformer, target):
    transformer = copy.deepcopy(flux_transformer)
    expected = EXPECTED_FLUX_TARGETS[target]

    assert set(find_target_layers(transformer, target)) == expected

    layers = inject_lora(transformer, target, RANK, ALPHA)
    assert set(layers) == expected
    wrapped = {name for name, module in transformer.named_modules() if isinstance(module, LoRALinear)}
    assert wrapped == expected


def test_unknown_target_lists_valid(unet, flux_transformer):
    with pytest.raises(ValueError, match="unknown target set 'mlp'") as sd_error:
        inject_lora(unet, "mlp", RANK, ALPHA)
    with pytest.raises(ValueError, match="unknown target set 'xattn'") as flux_error:
        find_target_layers(flux_transformer, "xattn")

    for name in EXPECTED_SD_TARGETS:
        assert name in str(sd_error.value)
    for name in EXPECTED_FLUX_TARGETS:
        assert name in str(flux_error.value)
    assert not any(isinstance(module, LoRALinear) for module in unet.modules())


def test_inject_twice_raises(unet):
    inject_lora(unet, "xattn", RANK, ALPHA)

    with pytest.raises(RuntimeError, match="already has LoRA layers"):
        inject_lora(unet, "noxattn", RANK, ALPHA)


def test_inject_freezes_model(unet):
    unet.requires_grad_(True)

    inject_lora(unet, "xattn", RANK, ALPHA)

    assert not any(parameter.requires_grad for parameter in unet.parameters())


def test_lora_disabled_restores_factors(unet):
    inputs = unet_inputs(batch=2)
    original = predict(unet, *inputs)
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    factors = random_factors(layers, batch=2)
    set_lora_factors(layers, factors)
    with_lora = predict(unet, *inputs)

    with lora_disabled(layers):
        inside = predict(unet, *inputs)
        assert all(layer.lora_A is None for layer in layers.values())

    assert torch.equal(inside, original)
    assert torch.equal(predict(unet, *inputs), with_lora)
    for name, layer in layers.items():
        assert layer.lora_A is factors[name][0]
        assert layer.lora_B is factors[name][1]


def test_delta_norm_matches_direct(unet):
    layers = inject_lora(unet, "attn", RANK, ALPHA)
    factors = random_factors(layers, batch=3)
    scale = ALPHA / RANK

    direct = torch.zeros(3)
    for lora_A, lora_B in factors.values():
        delta = scale * lora_B @ lora_A  # (batch, out, in)
        direct += delta.pow(2).sum(dim=(1, 2))
    direct = direct.sqrt()

    assert torch.allclose(lora_delta_norm(factors, scale), direct, rtol=1e-4)
    assert torch.allclose(lora_delta_norm_squared(factors, scale), direct.pow(2), rtol=1e-4)


def test_delta_norm_zero_has_finite_gradient(unet):
    # Every LoRA starts at B = 0, where the norm's square root has an infinite slope.
    layers = inject_lora(unet, "xattn", RANK, ALPHA)
    factors = random_factors(layers, batch=2, zero_B=True)
    leaves = [lora_B.requires_grad_(True) for _, lora_B in factors.values()]

    squared = lora_delta_norm_squared(factors, ALPHA / RANK)
    gradients = torch.autograd.grad(squared.sum(), leaves)

    assert torch.equal(lora_delta_norm(factors, ALPHA / RANK), torch.zeros(2))
    assert all(torch.isfinite(gradient).all() for gradient in gradients)


def test_lora_linear_keeps_linear_interface(unet):
    layers = inject_lora(unet, "xattn", RANK, ALPHA)

    for name, layer in layers.items():
        assert isinstance(layer.base, nn.Linear), name
        assert layer.weight is layer.base.weight
        assert layer.in_features == layer.base.in_features
        assert layer.out_features == layer.base.out_features


def test_inference_merge_matches_unmerged():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4)
    x = torch.randn(3, 5, 8)
    layer.lora_A, layer.lora_B = torch.randn(1, 2, 8), torch.randn(1, 6, 2)

    with torch.no_grad():
        merged = layer(x)
    unmerged = layer(x)  # with gradients enabled the factors stay separate

    assert layer._merged is not None
    assert torch.allclose(merged, unmerged.detach(), atol=1e-5)


def test_inference_merge_follows_new_factors():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=2)
    x = torch.randn(4, 8)
    layer.lora_A, layer.lora_B = torch.randn(1, 2, 8), torch.randn(1, 6, 2)
    with torch.no_grad():
        layer(x)

    lora_A, lora_B = torch.randn(1, 2, 8), torch.randn(1, 6, 2)
    layer.lora_A, layer.lora_B = lora_A, lora_B
    with torch.no_grad():
        output = layer(x)
    expected = layer.base(x) + x @ (lora_B[0] @ lora_A[0]).T

    assert torch.allclose(output, expected, atol=1e-5)
    clear_lora_factors({"layer": layer})
    assert layer._merged is None
