"""Tests of erase_eval.py: each metric against hand-computed values, then the whole script on tiny models."""

import importlib.machinery
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
import erase_eval
import toy_world
from tiny_models import make_tiny_clip, make_tiny_sd

REPO = Path(__file__).resolve().parent.parent
TOY_MODEL = REPO / "toy_model"

# Offline: nothing in these tests may reach the Hugging Face Hub.
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# A tiny checkpoint is enough to exercise every code path; its erasure means nothing. A fixed inner
# learning rate skips the calibration that train_sd.py otherwise runs first, which halves its time.
TINY_TRAINING = ["--steps", "2", "--hidden-dim", "16", "--trajectory-steps", "4", "--max-jump", "2",
                 "--sampling-steps", "2", "--batch-size", "2", "--xt-cache", "0", "--inner-lr", "1"]


@pytest.fixture
def restore_global_state():
    """Undo what an in-process erase_eval.main() changes for the rest of the test session."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    yield
    diffusers_logging.set_verbosity(verbosity)
    torch.set_flush_denormal(False)  # torch's default


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=OFFLINE_ENV, capture_output=True,
                          text=True, timeout=600)


def fake_prompt(group, mentions, label, base_predictions, erased_predictions, template_group=None):
    return {"group": group, "mentions": mentions, "label": label, "template_group": template_group,
            "base": {"prediction": base_predictions}, "erased": {"prediction": erased_predictions}}


# ----------------------------------------------------------------------------------------------------
# Metrics by hand

def test_classification_scores_by_hand():
    prompts = [
        # Erased prompts: the base model draws the airplane 4 of 4 times, the erased model once.
        fake_prompt("erased", {"airplane": "canonical"}, "airplane", ["airplane"] * 4,
                    ["airplane", "bird", "ship", "truck"]),
        # Synonym prompts: 2 of 4 still read as airplane after erasure.
        fake_prompt("synonym", {"airplane": "synonym"}, "airplane", ["airplane"] * 4,
                    ["airplane", "airplane", "bird", "cat"]),
        # Other prompts: 3 of 4 correct after erasure.
        fake_prompt("other", {}, "cat", ["cat", "cat"], ["cat", "dog"]),
        fake_prompt("other", {}, "dog", ["dog", "dog"], ["dog", "dog"]),
    ]
    scores = {model: erase_eval.erasure_scores(*erase_eval.classification_hits(prompts, model, ["airplane"]))
              for model in erase_eval.MODELS}

    erased = scores["erased"]
    assert erased["Acc_e"] == {"value": 0.25, "images": 4}
    assert erased["Acc_s"] == {"value": 0.5, "images": 4}
    assert erased["Acc_g"] == {"value": 0.75, "images": 4}
    # H = 3 / (1/0.75 + 1/0.5 + 1/0.75) = 3 / (14/3) = 9/14
    assert erased["H"] == pytest.approx(9 / 14)
    assert erased["per_concept"]["airplane"]["Acc_e"]["value"] == 0.25

    base = scores["base"]
    assert base["Acc_e"]["value"] == 1.0
    assert base["Acc_s"]["value"] == 1.0
    assert base["Acc_g"]["value"] == 1.0
    assert base["H"] == 0.0  # 1 - Acc_e = 0: nothing was erased


def test_harmonic_score_edge_cases():
    assert erase_eval.harmonic_score(0.0, 0.0, 1.0) == pytest.approx(1.0)
    # No synonym images: the harmonic mean of the two remaining terms, 2 / (1/0.5 + 1/0.5).
    assert erase_eval.harmonic_score(0.5, None, 0.5) == pytest.approx(0.5)
    assert erase_eval.harmonic_score(0.2, 0.4, 0.0) == 0.0
    assert erase_eval.harmonic_score(None, None, None) is None


def test_toy_scores_by_hand():
    circle = [{"name": "circle", "kind": "shape"}]

    def reads(shape, colour):
        return {"shape": shape, "colour": colour}

    prompts = [
        # "red circle": erased model draws a red square (erased, colour kept) and an unrecognised picture.
        fake_prompt("erased", {"circle": "canonical"}, reads("circle", "red"), [reads("circle", "red")] * 2,
                    [reads("square", "red"), reads(None, None)]),
        # "blue disc": still a circle once, colour kept both times.
        fake_prompt("synonym", {"circle": "synonym"}, reads("circle", "blue"), [reads("circle", "blue")] * 2,
                    [reads("circle", "blue"), reads("cross", "blue")]),
        # "green square": right once, wrong colour once, wrong shape once, both right once.
        fake_prompt("other", {}, reads("square", "green"), [reads("square", "green")] * 4,
                    [reads("square", "green"), reads("square", "red"), reads("cross", "green"), reads("square", "green")]),
    ]
    erased = erase_eval.toy_scores(prompts, "erased", circle)
    assert erased["Acc_e"] == {"value": 0.0, "images": 2}
    assert erased["Acc_s"] == {"value": 0.5, "images": 2}
    assert erased["Acc_g"] == {"value": 0.5, "images": 4}
    assert erased["shape_accuracy_other"]["value"] == 0.75
    assert erased["colour_accuracy_other"]["value"] == 0.75
    # Colour on the 4 erased and synonym images: red, unrecognised, blue, blue.
    assert erased["kept_attribute_accuracy"] == {"value": 0.75, "images": 4}
    # H = 3 / (1/1 + 1/0.5 + 1/0.5) = 0.6
    assert erased["H"] == pytest.approx(0.6)

    base = erase_eval.toy_scores(prompts, "base", circle)
    assert base["Acc_e"]["value"] == 1.0
    assert base["Acc_g"]["value"] == 1.0


def test_toy_kept_attribute_skips_erased_pair():
    concepts = [{"name": "circle", "kind": "shape"}, {"name": "red", "kind": "colour"}]

    def reads(shape, colour):
        return {"shape": shape, "colour": colour}

    prompts = [
        # "red circle" names both erased concepts: neither attribute is to be kept.
        fake_prompt("erased", {"circle": "canonical", "red": "canonical"}, reads("circle", "red"),
                    [reads("circle", "red")], [reads("square", "blue")]),
        # "green circle": the colour is kept.
        fake_prompt("erased", {"circle": "canonical"}, reads("circle", "green"), [reads("circle", "green")],
                    [reads("cross", "green")]),
        # "red square": the shape is lost.
        fake_prompt("erased", {"red": "canonical"}, reads("square", "red"), [reads("square", "red")],
                    [reads("cross", "blue")]),
    ]
    erased = erase_eval.toy_scores(prompts, "erased", concepts)

    assert erased["kept_attribute_accuracy"] == {"value": 0.5, "images": 2}
    assert erased["per_concept"]["circle"]["kept_attribute_accuracy"] == {"value": 1.0, "images": 1}
    assert erased["per_concept"]["red"]["kept_attribute_accuracy"] == {"value": 0.0, "images": 1}
    assert erased["per_concept"]["circle"]["Acc_e"] == {"value": 0.0, "images": 2}


def test_toy_metrics_split_template_groups():
    circle = [{"name": "circle", "kind": "shape"}]
    right = {"shape": "square", "colour": "green"}
    wrong = {"shape": "cross", "colour": "green"}
    prompts = [
        fake_prompt("other", {}, right, [right], [right], template_group="train templates"),
        fake_prompt("other", {}, right, [right], [wrong], template_group="held-out templates"),
    ]
    metrics = erase_eval.toy_metrics(prompts, circle)
    assert metrics["train templates"]["erased"]["Acc_g"]["value"] == 1.0
    assert metrics["held-out templates"]["erased"]["Acc_g"]["value"] == 0.0
    assert metrics["all templates"]["erased"]["Acc_g"] == {"value": 0.5, "images": 2}
    assert metrics["all templates"]["ratio_erased_to_base"]["Acc_g"] == 0.5


def test_toy_prompt_table():
    concepts = erase_eval.toy_concepts(["disc"])  # a synonym names the same concept
    assert concepts == [{"name": "circle", "kind": "shape"}]
    prompts = erase_eval.toy_prompts(concepts, toy_world.TEMPLATES, [0], 4.0)

    # Every template x 2 names per colour x 3 colours x 2 names per shape x 3 shapes.
    assert len(prompts) == len(toy_world.TEMPLATES) * 6 * 6
    groups = [prompt["group"] for prompt in prompts]
    assert groups.count("erased") == len(toy_world.TEMPLATES) * 6
    assert groups.count("synonym") == len(toy_world.TEMPLATES) * 6
    held_out = [prompt for prompt in prompts if prompt["template_group"] == "held-out templates"]
    assert len(held_out) == len(toy_world.HELD_OUT_TEMPLATES) * 36
    disc = next(prompt for prompt in prompts if prompt["prompt"] == "a scarlet disc")
    assert disc["mentions"] == {"circle": "synonym"}
    assert disc["label"] == {"shape": "circle", "colour": "red"}


def test_toy_concepts_reject_unknown_word():
    with pytest.raises(erase_eval.common.UserError, match="not a toy shape or colour"):
        erase_eval.toy_concepts(["triangle"])


def test_cmmd_identical_sets_are_zero():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=1)
    assert erase_eval.cmmd(x, x) == 0.0
    assert erase_eval.cmmd(x, x.clone()) == 0.0


def test_cmmd_two_points_by_hand():
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0]])
    # k_xx = k_yy = 1 and k_xy = exp(-||x - y||^2 / (2 * 10^2)) = exp(-2 / 200).
    expected = 1000 * (2 - 2 * math.exp(-0.01))
    assert erase_eval.cmmd(x, y) == pytest.approx(expected)


def test_cmmd_grows_with_shift():
    generator = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(32, 8, generator=generator), dim=1)
    direction = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    values = [erase_eval.cmmd(x, torch.nn.functional.normalize(x + shift * direction, dim=1))
              for shift in (0.0, 0.1, 0.5, 2.0)]
    assert values[0] == 0.0
    assert values[0] < values[1] < values[2] < values[3]


def test_count_exposed_parts_by_threshold():
    detections = [
        [("FEMALE_BREAST_EXPOSED", 0.9), ("FEMALE_BREAST_EXPOSED", 0.7), ("FACE_FEMALE", 0.95)],
        [("BELLY_EXPOSED", 0.65), ("BELLY_COVERED", 0.99)],
        [("FEET_EXPOSED", 0.4)],
        [],
    ]
    at_06 = erase_eval.count_exposed_parts(detections, 0.6)
    assert at_06["per_class"]["FEMALE_BREAST_EXPOSED"] == 2
    assert at_06["per_class"]["BELLY_EXPOSED"] == 1
    assert at_06["per_class"]["FEET_EXPOSED"] == 0
    assert at_06["total"] == 3
    assert at_06["flagged_images"] == 2
    assert at_06["flagged_share"] == 0.5
    assert at_06["images"] == 4
    assert "FACE_FEMALE" not in at_06["per_class"]

    totals = [erase_eval.count_exposed_parts(detections, threshold)["total"] for threshold in (0.3, 0.6, 0.8, 0.95)]
    assert totals == [4, 3, 1, 0]
    flagged = [erase_eval.count_exposed_parts(detections, threshold)["flagged_images"] for threshold in (0.3, 0.6, 0.8, 0.95)]
    assert flagged == [3, 2, 1, 0]


def test_pixel_differences_by_hand():
    base = torch.zeros(2, 3, 4, 4)
    erased = base.clone()
    erased[1, :, :2, :] = 0.5  # half of image 1 differs by 0.5
    assert erase_eval.pixel_differences(base, erased).tolist() == [0.0, 0.25]


def test_clip_scores_clip_at_zero():
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    text = torch.tensor([1.0, 0.0])
    assert erase_eval.clip_scores(images, text).tolist() == pytest.approx([100.0, 60.0, 0.0])


def test_nudity_csv_uses_i2p_columns(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text('prompt,sd_seed,sd_guidance_scale\n"a nude, painted",42,7\n,1,1\nplain prompt,,\n', encoding="utf-8")

    prompts = erase_eval.nudity_prompts(path, None, [0, 1], False, 7.5, False)
    assert [prompt["prompt"] for prompt in prompts] == ["a nude, painted", "plain prompt"]
    assert prompts[0]["seeds"] == [42, 43]
    assert prompts[0]["guidance_scale"] == 7.0
    assert prompts[1]["seeds"] == [0, 1]
    assert prompts[1]["guidance_scale"] == 7.5

    explicit = erase_eval.nudity_prompts(path, 1, [5], True, 3.0, True)
    assert len(explicit) == 1
    assert explicit[0]["seeds"] == [5]
    assert explicit[0]["guidance_scale"] == 3.0


def test_batches_keep_seeds_of_a_prompt_together():
    prompts = [{"seeds": [0, 1, 2], "guidance_scale": 7.5} for _ in range(5)]
    prompts[3]["guidance_scale"] = 5.0
    sizes = [len(batch) for batch in erase_eval.batches(prompts, 7)]
    assert sizes == [2, 1, 1, 1]  # 2 prompts fit in 7 images; a new guidance scale starts a new call


# ----------------------------------------------------------------------------------------------------
# The whole script on a tiny Stable Diffusion pipeline and a tiny CLIP

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train a tiny checkpoint, run the object task once in a subprocess and return its paths and arguments."""
    root = tmp_path_factory.mktemp("erase_eval")
    make_tiny_sd(root / "sd")
    make_tiny_clip(root / "clip")
    trained = run_script("train_sd.py", "--model", root / "sd", "--concept", "circle", *TINY_TRAINING,
                         "--out", root / "ckpt.pt")
    assert trained.returncode == 0, trained.stderr[-2000:]

    (root / "candidates.txt").write_text("circle\nsquare\ntriangle\nstar\n", encoding="utf-8")
    (root / "synonyms.csv").write_text("name,synonym\ncircle,disc\n", encoding="utf-8")
    (root / "retain.txt").write_text("a blue square\na red disc\n", encoding="utf-8")
    args = ["--hypernet", root / "ckpt.pt", "--task", "object", "--candidates", root / "candidates.txt",
            "--synonyms-file", root / "synonyms.csv", "--retain-file", root / "retain.txt",
            "--clip-model", root / "clip", "--steps", "2", "--num-images", "2", "--batch-size", "64"]
    result = run_script("erase_eval.py", *args, "--out-dir", root / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    return root, [str(arg) for arg in args], result.stdout


def test_script_writes_metrics_report_grid(tiny_run):
    root, _, stdout = tiny_run
    out = root / "run"
    metrics = json.loads((out / "metrics.json").read_text())

    # 5 templates x (circle, disc, square, triangle, star) plus one retain prompt ("a red disc" names a synonym).
    assert metrics["settings"]["prompts"] == 26
    assert metrics["settings"]["erased"] == ["circle"]
    for model in erase_eval.MODELS:
        scores = metrics["erasure"][model]
        assert scores["Acc_e"]["images"] == 10
        assert scores["Acc_s"]["images"] == 10
        assert scores["Acc_g"]["images"] == 30
        assert 0 <= scores["H"] <= 1
    for name in ("Acc_e", "Acc_s", "Acc_g", "H", "clip_score", "cmmd", "pixel_difference", "lora_strength"):
        assert name in metrics["definitions"]

    assert set(metrics["preservation"]) == {"erased", "synonym", "other", "retain"}
    other = metrics["preservation"]["other"]
    assert other["cmmd"]["value"] >= 0
    assert other["pixel_difference"]["images"] == 30
    assert set(other["clip_score"]) == {"base", "erased", "images"}
    assert metrics["skipped"] == {}

    records = metrics["prompts"]
    assert [record["prompt"] for record in records if record["group"] == "retain"] == ["a blue square"]
    assert all(record["lora_strength"] > 0 for record in records)
    assert all(len(record["erased"]["prediction"]) == 2 for record in records if record["group"] != "retain")
    assert len(list((out / "images" / "base").glob("*.png"))) == 2 * len(records)

    assert (out / "report.md").read_text().startswith("# Erasure evaluation: object")
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * common.GRID_MIN_CELL
    assert "Acc_e" in stdout
    assert "CMMD" in stdout


def test_same_seeds_same_metrics(tiny_run, tmp_path, restore_global_state):
    root, args, _ = tiny_run
    erase_eval.main(args + ["--out-dir", str(tmp_path)])
    assert (tmp_path / "metrics.json").read_bytes() == (root / "run" / "metrics.json").read_bytes()


def test_shards_merge_into_one_report(tiny_run, tmp_path, restore_global_state):
    root, args, _ = tiny_run
    for shard in ("0/2", "1/2"):
        erase_eval.main(args + ["--shard", shard, "--out-dir", str(tmp_path)])
    assert sorted(path.name for path in tmp_path.glob("shard-*.pt")) == ["shard-0-of-2.pt", "shard-1-of-2.pt"]
    erase_eval.main(["--merge", str(tmp_path)])

    merged = json.loads((tmp_path / "metrics.json").read_text())
    single = json.loads((root / "run" / "metrics.json").read_text())
    assert merged["settings"] == single["settings"]
    assert [record["prompt"] for record in merged["prompts"]] == [record["prompt"] for record in single["prompts"]]
    # Shards batch other prompts together, so float rounding may differ in the last digits.
    for merged_record, single_record in zip(merged["prompts"], single["prompts"]):
        assert merged_record["lora_strength"] == pytest.approx(single_record["lora_strength"], rel=1e-4)
        assert merged_record["pixel_difference"] == pytest.approx(single_record["pixel_difference"], abs=1e-5)
    assert (tmp_path / "grid.png").is_file()


def test_merge_rejects_missing_shard(tiny_run, tmp_path, restore_global_state):
    root, args, _ = tiny_run
    erase_eval.main(args + ["--shard", "1/3", "--out-dir", str(tmp_path), "--num-images", "1"])
    with pytest.raises(erase_eval.common.UserError, match=r"missing: \[0, 2\]"):
        erase_eval.main(["--merge", str(tmp_path)])


class FakeNudeDetector:
    """Stands in for nudenet.NudeDetector: every image shows one exposed breast (0.7) and a face (0.9)."""

    def detect(self, path):
        assert Path(path).is_file()
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 4, 4]},
                {"class": "FACE_FEMALE", "score": 0.9, "box": [4, 4, 4, 4]}]


def test_nudity_task_counts_detections(tiny_run, tmp_path, monkeypatch, restore_global_state):
    root, args, _ = tiny_run
    fake = types.ModuleType("nudenet")
    fake.__spec__ = importlib.machinery.ModuleSpec("nudenet", None)
    fake.NudeDetector = FakeNudeDetector
    monkeypatch.setitem(sys.modules, "nudenet", fake)
    (tmp_path / "i2p.csv").write_text("prompt,sd_seed,sd_guidance_scale\na red circle,3,5\na blue star,4,5\n",
                                      encoding="utf-8")

    erase_eval.main(["--hypernet", args[1], "--task", "nudity", "--prompts-csv", str(tmp_path / "i2p.csv"),
                     "--retain-file", str(root / "retain.txt"), "--clip-model", str(root / "clip"), "--steps", "1",
                     "--num-images", "2", "--out-dir", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    for model in erase_eval.MODELS:
        counts = metrics["nudity"][model]
        assert counts["images"] == 4
        assert counts["per_class"]["FEMALE_BREAST_EXPOSED"] == 4
        assert counts["total"] == 4
        assert counts["flagged_images"] == 4
    assert metrics["nudity"]["threshold"] == 0.6
    assert [record["seeds"] for record in metrics["prompts"][:2]] == [[3, 4], [4, 5]]
    assert metrics["prompts"][0]["guidance_scale"] == 5.0
    assert "cmmd" in metrics["preservation"]["retain"]
    assert "FEMALE_BREAST_EXPOSED" in (tmp_path / "out" / "report.md").read_text()


def test_celebrity_report_names_clip_stand_in(tiny_run, tmp_path, restore_global_state):
    root, args, _ = tiny_run
    erase_eval.main(["--hypernet", args[1], "--task", "celebrity", "--erased", "circle", "--candidates",
                     str(root / "candidates.txt"), "--clip-model", str(root / "clip"), "--steps", "1",
                     "--num-images", "1", "--batch-size", "64", "--out-dir", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "stands in for the GIPHY celebrity detector" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["erasure"]["erased"]["Acc_s"]["images"] == 0  # no synonyms were given
    assert metrics["erasure"]["erased"]["Acc_s"]["value"] is None


def test_unloadable_clip_model_is_one_line_error(tiny_run, tmp_path, restore_global_state):
    _, args, _ = tiny_run
    clip_position = args.index("--clip-model") + 1
    broken = args[:clip_position] + [str(tmp_path / "no_such_clip")] + args[clip_position + 1:]
    with pytest.raises(erase_eval.common.UserError, match="could not load CLIP model") as error:
        erase_eval.main(broken + ["--out-dir", str(tmp_path)])
    assert "\n" not in str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("nudenet") is not None, reason="nudenet is installed here")
def test_nudity_without_nudenet_fails_in_one_line(tmp_path):
    (tmp_path / "prompts.csv").write_text("prompt\na person\n", encoding="utf-8")
    result = run_script("erase_eval.py", "--hypernet", tmp_path / "missing.pt", "--task", "nudity",
                        "--prompts-csv", tmp_path / "prompts.csv")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "pip install nudenet" in lines[0]


# ----------------------------------------------------------------------------------------------------
# The toy world with its exact oracle

@pytest.mark.skipif(not (TOY_MODEL / "model_index.json").is_file(),
                    reason="toy_model/ is not built; run `python toy_world.py train --out toy_model`")
def test_toy_task_with_oracle(tmp_path):
    trained = run_script("train_sd.py", "--model", "toy", "--concept", "circle", *TINY_TRAINING,
                         "--out", tmp_path / "toy.pt")
    assert trained.returncode == 0, trained.stderr[-2000:]

    # One training template and the held-out one keep the run short; every colour and shape name is used.
    (tmp_path / "templates.txt").write_text("{colour} {shape}\n" + toy_world.HELD_OUT_TEMPLATES[0] + "\n",
                                            encoding="utf-8")
    result = run_script("erase_eval.py", "--hypernet", tmp_path / "toy.pt", "--task", "toy",
                        "--templates-file", tmp_path / "templates.txt", "--steps", "1", "--guidance-scale", "1",
                        "--num-images", "1", "--out-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    assert set(metrics["erasure"]) == {"all templates", "train templates", "held-out templates"}
    scores = metrics["erasure"]["all templates"]
    for model in erase_eval.MODELS:
        for name in ("Acc_e", "Acc_s", "Acc_g", "shape_accuracy_other", "colour_accuracy_other",
                     "kept_attribute_accuracy"):
            assert 0 <= scores[model][name]["value"] <= 1
    assert scores["base"]["Acc_e"]["images"] == 2 * 6  # 2 templates x 6 colour names
    assert set(scores["ratio_erased_to_base"]) == {"Acc_g", "shape_accuracy_other", "colour_accuracy_other"}

    assert set(metrics["skipped"]) == {"clip_score", "cmmd"}
    assert "cmmd" not in metrics["preservation"]["other"]
    assert metrics["preservation"]["other"]["pixel_difference"]["images"] == 2 * 24  # 6 colour names x 4 other shape names
    assert len(metrics["prompts"]) == 2 * 36
    assert all("lora_strength" in record for record in metrics["prompts"])
