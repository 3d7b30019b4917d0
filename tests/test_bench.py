"""The benchmark's own logic: the hypernetwork width it picks and the order it times in."""

import sys

from helpers import REPO_DIR

sys.path.insert(0, str(REPO_DIR / "benchmarks"))
import bench  # noqa: E402


def share(unet_config, hidden_dim):
    shapes, unet_parameters = bench.xattn_layout(unet_config)
    return bench.hypernet_parameters(shapes, hidden_dim) / unet_parameters


def test_matched_width_keeps_sd_share():
    sd_share = share(bench.SD14_UNET, bench.SD14_HIDDEN_DIM)
    width = bench.matched_hidden_dim(bench.REDUCED_UNET)

    assert 0.9 < share(bench.REDUCED_UNET, width) / sd_share < 1.1
    # The reason for matching: at SD's own width the hypernetwork would outweigh its share many times.
    assert share(bench.REDUCED_UNET, bench.SD14_HIDDEN_DIM) > 5 * sd_share


def test_interleaved_medians_alternate():
    calls = []
    functions = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}

    medians = bench.interleaved_medians(functions, repeats=3, device="cpu")

    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert set(medians) == {"a", "b"}
    assert all(seconds >= 0 for seconds in medians.values())
