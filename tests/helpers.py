"""Helpers shared by the tests: running the scripts, small training settings, measuring the task loss."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import trainer

REPO_DIR = Path(__file__).resolve().parent.parent

# Training settings small enough for a tiny model on a CPU: a few seconds per run.
TINY_TRAIN_ARGS = (
    "--concept", "circle",
    "--hidden-dim", "32",
    "--trajectory-steps", "4",
    "--max-jump", "2",
    "--sampling-steps", "3",
    "--batch-size", "2",
    "--log-every", "1",
)  # fmt: skip


def script_env():
    """Environment for script subprocesses: offline, unbuffered output, one CPU thread.

    The tiny models run faster on one thread than on several that compete with other work.
    """
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def script_command(script, *args):
    return [sys.executable, str(REPO_DIR / script), *map(str, args)]


def run_script(script, *args, timeout=300):
    """Run a repository script to completion and return the CompletedProcess with text output."""
    return subprocess.run(
        script_command(script, *args),
        cwd=REPO_DIR,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr):
    """The non-empty lines of a script's stderr."""
    return [line for line in stderr.splitlines() if line.strip()]


def measure_task_loss(erasure, seed=123):
    """Return the mean task loss of the LoRA at s = S on every erase prompt, three times, at fixed x_t.

    x_t is sampled from the base model with its own generator, so the value before and after training
    is computed on the same inputs.
    """
    pooled = erasure.prompts["erase_pooled"]
    index = torch.arange(len(pooled)).repeat(3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base_factors = erasure.network(pooled[index], 0)  # B = 0 at s = 0: the base model
        erase_cond = trainer.cond_rows(erasure.prompts["erase_cond"], index)
        x_t, timesteps = erasure.sample_x_t(erase_cond, base_factors, generator)
        target = erasure.negative_guidance_target(x_t, timesteps, index)
        factors = erasure.network(pooled[index], erasure.steps_S)
        return erasure.task_loss(factors, x_t, timesteps, index, target).mean().item()


def measure_task_loss_around_training(monkeypatch, after_training=None):
    """Patch trainer.train to record the task loss before and after a run; return the dict it fills.

    after_training(erasure, measured), if given, records more values once training has finished.
    """
    measured = {}
    real_train = trainer.train

    def train_and_measure(erasure, config, resume_path=None):
        measured["before"] = measure_task_loss(erasure)
        final_step = real_train(erasure, config, resume_path)
        measured["after"] = measure_task_loss(erasure)
        if after_training is not None:
            after_training(erasure, measured)
        return final_step

    monkeypatch.setattr(trainer, "train", train_and_measure)
    return measured
