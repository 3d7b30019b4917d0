"""Tests of saving, loading and attaching hypernetwork checkpoints."""

import argparse

import pytest
import torch
from diffusers import UNet2DConditionModel

import common
import trainer
from common import UserError
from hypernet import HyperNetwork
from lora_inject import inject_lora, layer_shapes

RANK = 4
ALPHA = 4.0
TRAJECTORY_STEPS = 10


def make_checkpoint(path, model_dir, family, target, step=7):
    """Save a checkpoint of a hypernetwork with random weights for a model, and return the network.

    One AdamW step fills the optimizer state, so the file contains everything a training run saves.
    """
    pipe = common.load_pipeline(model_dir, family)
    layers = inject_lora(common.denoiser_of(pipe), target, RANK, ALPHA)
    embed_dim = pipe.text_encoder.config.hidden_size
    network = HyperNetwork(layer_shapes(layers), embed_dim, RANK, hidden_dim=32, trajectory_steps=TRAJECTORY_STEPS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))

    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    factors = network(torch.randn(2, embed_dim, generator=generator), TRAJECTORY_STEPS)
    sum(lora_B.sum() for _, lora_B in factors.values()).backward()
    optimizer.step()

    args = argparse.Namespace(model=str(model_dir), target=target, rank=RANK, alpha=ALPHA)
    config = trainer.make_config(args, family, network, [["circle", ""]], ["a blue square"], ["a red circle"])
    common.save_checkpoint(path, network, config, step, optimizer)
    return network


@pytest.fixture
def sd_checkpoint(tmp_path, tiny_sd_dir):
    path = tmp_path / "sd.pt"
    network = make_checkpoint(path, tiny_sd_dir, "sd", "xattn")
    return path, network


def test_save_load_same_lora(sd_checkpoint, tiny_sd_dir):
    path, network = sd_checkpoint
    pipe = common.load_pipeline(tiny_sd_dir, "sd")
    pooled = common.encode_pooled(pipe, ["a red circle", "a blue square"])

    checkpoint = common.load_checkpoint(path)
    loaded = common.network_from_checkpoint(checkpoint)
    expected = common.generate_factors(network.eval(), pooled)
    actual = common.generate_factors(loaded, pooled)

    assert checkpoint["step"] == 7
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name][0], expected[name][0]), name
        assert torch.equal(actual[name][1], expected[name][1]), name


def test_attach_gives_same_lora(sd_checkpoint, tiny_sd_dir):
    path, network = sd_checkpoint
    pipe = common.load_pipeline(tiny_sd_dir, "sd")
    pooled = common.encode_pooled(pipe, ["a red circle"])

    layers, attached = common.attach_checkpoint(pipe, common.load_checkpoint(path), path, str(tiny_sd_dir))
    expected = common.generate_factors(network.eval(), pooled)
    actual = common.generate_factors(attached, pooled)

    assert set(layers) == set(expected)
    for name in expected:
        assert torch.equal(actual[name][1], expected[name][1]), name


def test_checkpoint_loads_weights_only(sd_checkpoint):
    path, network = sd_checkpoint

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)

    assert checkpoint["format_version"] == common.CHECKPOINT_FORMAT_VERSION
    assert checkpoint["config"]["network"] == network.config
    assert checkpoint["optimizer"]["state"]


def test_save_leaves_no_temporary_file(sd_checkpoint):
    path, network = sd_checkpoint
    config = common.load_checkpoint(path)["config"]

    common.save_checkpoint(path, network, config, step=8)

    assert [entry.name for entry in path.parent.iterdir()] == [path.name]
    assert common.load_checkpoint(path)["step"] == 8


def test_failed_save_keeps_old_checkpoint(sd_checkpoint, monkeypatch):
    path, network = sd_checkpoint
    config = common.load_checkpoint(path)["config"]

    def write_half_then_fail(obj, destination):
        with open(destination, "wb") as handle:
            handle.write(b"PK\x03\x04 half of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        common.save_checkpoint(path, network, config, step=8)
    monkeypatch.undo()

    assert common.load_checkpoint(path)["step"] == 7
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]


def test_other_layer_shapes_rejected(sd_checkpoint, tiny_sd_dir, tiny_sd_other_shapes_dir):
    path, _ = sd_checkpoint
    pipe = common.load_pipeline(tiny_sd_other_shapes_dir, "sd")

    with pytest.raises(UserError) as error:
        common.attach_checkpoint(pipe, common.load_checkpoint(path), path, "other-model")

    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    assert str(tiny_sd_dir) in message
    assert "other-model" in message
    assert "attn2.to_k" in message


def test_extra_target_layers_rejected(sd_checkpoint, tiny_sd_dir):
    # Two transformer blocks per UNet block: every layer of the checkpoint exists with its shape,
    # but the model has more target layers than the checkpoint writes factors for.
    path, _ = sd_checkpoint
    pipe = common.load_pipeline(tiny_sd_dir, "sd")
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "layers_per_block": 2})

    with pytest.raises(UserError) as error:
        common.attach_checkpoint(pipe, common.load_checkpoint(path), path, "deeper-model")

    message = str(error.value)
    assert "\n" not in message
    assert "does not fit deeper-model" in message
    assert "4 target layers that the checkpoint lacks" in message


def test_flux_checkpoint_on_sd_rejected(tmp_path, tiny_flux_dir, tiny_sd_dir):
    path = tmp_path / "flux.pt"
    make_checkpoint(path, tiny_flux_dir, "flux", "vo")
    pipe = common.load_pipeline(tiny_sd_dir, "sd")

    with pytest.raises(UserError) as error:
        common.attach_checkpoint(pipe, common.load_checkpoint(path), path, "sd-model")

    message = str(error.value)
    assert "\n" not in message
    assert "a Flux model" in message
    assert "sd-model is a Stable Diffusion model" in message


def test_sd_checkpoint_on_flux_rejected(sd_checkpoint, tiny_flux_dir):
    path, _ = sd_checkpoint
    pipe = common.load_pipeline(tiny_flux_dir, "flux")

    with pytest.raises(UserError) as error:
        common.attach_checkpoint(pipe, common.load_checkpoint(path), path, "flux-model")

    message = str(error.value)
    assert "a Stable Diffusion model" in message
    assert "flux-model is a Flux model" in message


def test_foreign_torch_file_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, path)

    with pytest.raises(UserError, match="not an unhype checkpoint"):
        common.load_checkpoint(path)


def test_truncated_checkpoint_rejected(sd_checkpoint):
    path, _ = sd_checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(UserError, match="damaged or not a torch file"):
        common.load_checkpoint(path)


def test_folder_as_checkpoint_rejected(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        common.load_checkpoint(tmp_path)
