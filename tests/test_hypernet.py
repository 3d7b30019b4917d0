"""Tests of the hypernetwork and the static LoRA on the LoRA layers of the tiny SD UNet."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from hypernet import HyperNetwork, StaticLoRA, build_from_config, count_parameters
from lora_inject import inject_lora, layer_shapes, lora_delta_norm, set_lora_factors
from tiny_models import CLIP_HIDDEN_SIZE, MAX_TOKENS

RANK = 4
ALPHA = 4.0
HIDDEN_DIM = 32
TRAJECTORY_STEPS = 10


@pytest.fixture(scope="module")
def loaded_unet(tiny_sd_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()


@pytest.fixture
def unet_and_layers(loaded_unet):
    unet = copy.deepcopy(loaded_unet)
    return unet, inject_lora(unet, "xattn", RANK, ALPHA)


def make_hypernet(shapes):
    return HyperNetwork(shapes, CLIP_HIDDEN_SIZE, RANK, hidden_dim=HIDDEN_DIM, trajectory_steps=TRAJECTORY_STEPS)


def randomize(network, seed=0):
    """Overwrite every parameter with noise, as if trained, so zero-initialised heads hide nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return network


def random_embeddings(batch, seed=0):
    return torch.randn(batch, CLIP_HIDDEN_SIZE, generator=torch.Generator().manual_seed(seed))


def unet_inputs(batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    prompt_embeds = torch.randn(batch, MAX_TOKENS, CLIP_HIDDEN_SIZE, generator=generator)
    return x_t, timesteps, prompt_embeds


def test_step_zero_B_is_zero(unet_and_layers):
    _, layers = unet_and_layers
    network = randomize(make_hypernet(layer_shapes(layers)))
    embeddings = random_embeddings(batch=3)

    at_start = network(embeddings, 0)
    at_end = network(embeddings, TRAJECTORY_STEPS)

    for name, (lora_A, lora_B) in at_start.items():
        assert torch.equal(lora_B, torch.zeros_like(lora_B)), name
        assert lora_A.abs().sum() > 0, name
    assert (lora_delta_norm(at_end, ALPHA / RANK) > 0).all()


def test_step_tensor_matches_int(unet_and_layers):
    _, layers = unet_and_layers
    network = randomize(make_hypernet(layer_shapes(layers)))
    embeddings = random_embeddings(batch=2)

    from_int = network(embeddings, 3)
    from_tensor = network(embeddings, torch.tensor([3, 3]))
    mixed = network(embeddings, torch.tensor([3, 7]))

    for name in from_int:
        assert torch.equal(from_int[name][1], from_tensor[name][1]), name
        assert torch.equal(mixed[name][1][0], from_int[name][1][0]), name
        assert not torch.equal(mixed[name][1][1], from_int[name][1][1]), name


def test_factor_shapes_per_layer(unet_and_layers):
    _, layers = unet_and_layers
    network = make_hypernet(layer_shapes(layers))

    factors = network(random_embeddings(batch=3), TRAJECTORY_STEPS)

    assert set(factors) == set(layers)
    for name, (lora_A, lora_B) in factors.items():
        assert lora_A.shape == (3, RANK, layers[name].in_features), name
        assert lora_B.shape == (3, layers[name].out_features, RANK), name


def test_prompts_get_different_factors(unet_and_layers):
    _, layers = unet_and_layers
    network = randomize(make_hypernet(layer_shapes(layers)))

    factors = network(random_embeddings(batch=2), TRAJECTORY_STEPS)

    for name, (lora_A, lora_B) in factors.items():
        assert not torch.allclose(lora_B[0], lora_B[1]), name


@pytest.mark.parametrize("kind", ["hypernet", "static"])
def test_gradients_reach_only_network(unet_and_layers, kind):
    unet, layers = unet_and_layers
    shapes = layer_shapes(layers)
    network = randomize(make_hypernet(shapes) if kind == "hypernet" else StaticLoRA(shapes, RANK))
    x_t, timesteps, prompt_embeds = unet_inputs(batch=2)

    set_lora_factors(layers, network(random_embeddings(batch=2), TRAJECTORY_STEPS))
    loss = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample.pow(2).mean()
    loss.backward()

    unet_parameters = list(unet.named_parameters())
    assert unet_parameters
    for name, parameter in unet_parameters:
        assert parameter.grad is None, name
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_equal_shapes_share_heads(unet_and_layers):
    _, layers = unet_and_layers
    shapes = layer_shapes(layers)

    network = make_hypernet(shapes)

    # xattn in the tiny UNet: to_k and to_v map the 16-wide text to 8 channels in three blocks and to
    # 16 channels in the mid block.
    assert sorted(set(shapes.values())) == [(8, 16), (16, 16)]
    assert len(network.heads) == 2
    assert sorted(head.num_layers for head in network.heads) == [2, 6]


def test_parameters_grow_with_shapes():
    few = {f"layer{i}": (8, 16) for i in range(3)}
    many = {f"layer{i}": (8, 16) for i in range(6)}
    other_shape = {**few, "wide": (32, 16)}

    extra_layers = count_parameters(make_hypernet(many)) - count_parameters(make_hypernet(few))
    extra_shape = count_parameters(make_hypernet(other_shape)) - count_parameters(make_hypernet(few))

    # A layer of a known shape adds only its layer embedding and its lora_A base, while a new shape
    # adds a whole head: mix (hidden x hidden + hidden), head_A and head_B.
    assert extra_layers == 3 * (HIDDEN_DIM + RANK * 16)
    head = (HIDDEN_DIM + 1) * HIDDEN_DIM + (HIDDEN_DIM + 1) * RANK * 16 + (HIDDEN_DIM + 1) * 32 * RANK
    assert extra_shape == head + HIDDEN_DIM + RANK * 16


def test_static_lora_starts_at_zero(unet_and_layers):
    unet, layers = unet_and_layers
    network = StaticLoRA(layer_shapes(layers), RANK)
    x_t, timesteps, prompt_embeds = unet_inputs(batch=2)
    with torch.no_grad():
        original = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample

    factors = network(random_embeddings(batch=2))
    set_lora_factors(layers, factors)
    with torch.no_grad():
        with_lora = unet(x_t, timesteps, encoder_hidden_states=prompt_embeds).sample

    assert torch.equal(lora_delta_norm(factors, ALPHA / RANK), torch.zeros(2))
    assert torch.equal(with_lora, original)
    for name, (lora_A, _) in factors.items():
        assert lora_A.abs().sum() > 0, name


def test_static_lora_ignores_prompt(unet_and_layers):
    _, layers = unet_and_layers
    network = randomize(StaticLoRA(layer_shapes(layers), RANK))

    first = network(random_embeddings(batch=1, seed=0), 0)
    second = network(random_embeddings(batch=1, seed=1), TRAJECTORY_STEPS)

    for name in first:
        assert torch.equal(first[name][0], second[name][0]), name
        assert torch.equal(first[name][1], second[name][1]), name


@pytest.mark.parametrize("kind", ["hypernet", "static"])
def test_config_round_trip_identical(unet_and_layers, kind):
    _, layers = unet_and_layers
    shapes = layer_shapes(layers)
    network = randomize(make_hypernet(shapes) if kind == "hypernet" else StaticLoRA(shapes, RANK))
    embeddings = random_embeddings(batch=2)

    rebuilt = build_from_config(network.config)
    rebuilt.load_state_dict(network.state_dict())

    assert type(rebuilt) is type(network)
    assert rebuilt.config == network.config
    for step in (0, 5, TRAJECTORY_STEPS):
        expected = network(embeddings, step)
        actual = rebuilt(embeddings, step)
        for name in expected:
            assert torch.equal(actual[name][0], expected[name][0]), (step, name)
            assert torch.equal(actual[name][1], expected[name][1]), (step, name)


def test_unknown_network_kind_raises(unet_and_layers):
    _, layers = unet_and_layers
    config = dict(make_hypernet(layer_shapes(layers)).config, kind="mlp")

    with pytest.raises(ValueError, match="unknown network kind 'mlp'"):
        build_from_config(config)
