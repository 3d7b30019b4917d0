"""Helpers shared by the Stable Diffusion tests: running the scripts and small training settings."""

import os
import subprocess
import sys
from pathlib import Path

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
