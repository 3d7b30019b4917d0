"""Fixtures shared by the tests: tiny model folders on disk and training runs reused by several tests."""

import os

# Nothing in the tests may download. huggingface_hub reads this when it is first imported, so it is
# set before tiny_models imports diffusers.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import tiny_models
from helpers import TINY_TRAIN_ARGS, run_script
from tiny_models import make_tiny_flux, make_tiny_sd

# A cross-attention width other than tiny_models.CLIP_HIDDEN_SIZE (16), so the to_k and to_v layers
# of this model have other shapes than those of the default tiny SD model.
OTHER_CROSS_ATTENTION_DIM = 24


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The tiny models run faster on one thread than on several that compete with other work.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd") / "model"
    make_tiny_sd(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_other_shapes_dir(tmp_path_factory):
    """A tiny SD folder whose text encoder and cross-attention are OTHER_CROSS_ATTENTION_DIM wide.

    make_tiny_sd(sd2_like=True) would not do: it changes the head count and adds linear projections,
    but its attention layers keep the shapes of the default model.
    """
    path = tmp_path_factory.mktemp("tiny_sd_other_shapes") / "model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "CLIP_HIDDEN_SIZE", OTHER_CROSS_ATTENTION_DIM)
        make_tiny_sd(path)
    return path


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux") / "model"
    make_tiny_flux(path)
    return path


@pytest.fixture(scope="session")
def direct_run(tiny_sd_dir, tmp_path_factory):
    """A finished 3-step `--objective direct` training run: (CompletedProcess, checkpoint path)."""
    checkpoint = tmp_path_factory.mktemp("direct_run") / "ckpt.pt"
    result = run_script(
        "train_sd.py", "--model", tiny_sd_dir, *TINY_TRAIN_ARGS, "--objective", "direct", "--steps", 3, "--out", checkpoint
    )
    return result, checkpoint
