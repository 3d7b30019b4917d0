"""Code shared by the training, sampling and evaluation scripts: models, prompts, checkpoints, errors."""

import csv
import json
import os
import re
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from hypernet import build_from_config
from lora_inject import inject_lora, layer_shapes, lora_delta_norm, set_lora_factors

REPO_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = REPO_DIR / "toy_model"
CHECKPOINT_FORMAT_VERSION = 1

# Prompt templates that place a concept inside a longer prompt, so the hypernetwork learns to fire on
# the concept wherever it appears. The anchor prompt fills the same template with the anchor.
DEFAULT_TEMPLATES = (
    "{}",
    "a photo of {}",
    "a painting of {}",
    "a painting by {}",
    "an image of {}",
    "a picture in the style of {}",
    "a close-up photo of {}",
    "a drawing of {}, detailed",
    "{}, high quality, 4k",
    "a portrait of {}",
)

# Prompts the erased model must keep drawing as before, written for this project: everyday scenes,
# animals, objects, people and several art styles, so the hypernetwork learns to stay silent on them.
BUILTIN_RETAIN_PROMPTS = (
    "a photo of a dog running on the beach",
    "a cat sleeping on a windowsill",
    "a bowl of fresh fruit on a wooden table",
    "a city street at night with neon lights",
    "a mountain lake at sunrise",
    "a red sports car parked in front of a house",
    "a portrait of an old fisherman",
    "a child flying a kite in a park",
    "a watercolor painting of a lighthouse",
    "an oil painting of a field of sunflowers",
    "a pencil sketch of a horse",
    "a bowl of ramen with chopsticks",
    "a cozy living room with a fireplace",
    "a group of friends having a picnic",
    "a snowy forest with a wooden cabin",
    "a sailboat on a calm sea",
    "a close-up photo of a bee on a flower",
    "a woman reading a book in a cafe",
    "a futuristic city skyline, digital art",
    "an astronaut floating above the earth",
    "a plate of pancakes with berries",
    "a train crossing a stone bridge",
    "a green parrot on a branch",
    "a man riding a bicycle through the rain",
)


class UserError(Exception):
    """A problem with the user's input or setup, reported as one line without a traceback."""


def run_cli(main):
    """Run a script's main(), turning a UserError into a one-line message and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The training loop saves its own checkpoint on Ctrl-C; this is an interrupt before or after it.
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------------
# Models

def resolve_model(model):
    """Map the short name "toy" to the shipped toy model folder; leave hub ids and paths alone."""
    if model == "toy":
        return str(TOY_MODEL_DIR)
    return model


def is_toy_model(model):
    return Path(resolve_model(model)).resolve() == TOY_MODEL_DIR


FAMILY_NAMES = {"flux": "Flux", "sd": "Stable Diffusion"}


def local_model_family(model):
    """Return "flux" or "sd" for a local diffusers folder, read from the pipeline class in model_index.json.

    Returns None for a hub id or a folder without a readable model_index.json, because such a model
    shows its family only when it loads. Any class other than a Flux one counts as "sd".
    """
    index_path = Path(resolve_model(model)) / "model_index.json"
    if not index_path.is_file():
        return None
    try:
        class_name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        return None
    return "flux" if str(class_name).startswith("Flux") else "sd"


def load_pipeline(model, family, dtype=torch.float32, device="cpu"):
    """Load a diffusers pipeline from a hub id or a local folder, with a one-line error on failure."""
    from transformers.utils import logging as transformers_logging

    # Importing the pipelines makes transformers warn about image processors these scripts never use.
    transformers_logging.set_verbosity_error()
    from diffusers import FluxPipeline, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    pipeline_class = FluxPipeline if family == "flux" else StableDiffusionPipeline
    path = resolve_model(model)
    found_family = local_model_family(model)
    if found_family is not None and found_family != family:
        raise UserError(
            f"model {model!r} is a {FAMILY_NAMES[found_family]} model, not a {FAMILY_NAMES[family]} model: "
            f"train_sd.py trains Stable Diffusion models and train_flux.py trains Flux models"
        )
    kwargs = {"dtype": dtype}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)

    # The hub client logs connection warnings before it raises; the UserError below reports it once.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = pipeline_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"could not load model {model!r} as a {pipeline_class.__name__}: it is not a local diffusers "
            f"folder and the Hugging Face Hub could not provide it (no network, no access, or no such "
            f"model: {reason[:160]}). Pass a local folder with --model PATH, or log in and connect to the Hub."
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)

    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def denoiser_of(pipe):
    """Return the network that the LoRA edits: the UNet of SD, the transformer of Flux."""
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


def resolve_device_and_dtype(device, dtype, cuda_default="fp16"):
    """Pick the device and the base model's dtype; fp16 is rejected on a CPU, where it has no kernels.

    Without a dtype, a CUDA device gets `cuda_default` (Flux passes "bf16") and a CPU gets fp32.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (cuda_default if device.startswith("cuda") else "fp32")
    if dtype == "fp16" and not device.startswith("cuda"):
        raise UserError("fp16 needs a CUDA device; use --dtype bf16 or --dtype fp32 on a CPU")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return device, dtype, torch_dtype


# ----------------------------------------------------------------------------------------------------
# Prompts

def clean_concept(text, what="concept"):
    """Normalise whitespace and reject an empty or unprintable concept."""
    cleaned = re.sub(r"\s+", " ", str(text)).strip()
    if not cleaned:
        raise UserError(f"empty {what}: give a name such as --concept \"van gogh\"")
    if not any(character.isalnum() for character in cleaned):
        raise UserError(f"invalid {what} {text!r}: it has no letters or digits")
    return cleaned


def read_concepts_file(path):
    """Read (concept, anchor) pairs from a CSV with a `concept` column and an optional `anchor` column.

    The csv module handles quoting, so a quoted name may contain commas.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"concepts file not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "concept" not in reader.fieldnames:
            raise UserError(f"invalid concepts file {path}: the first line must name a 'concept' column")
        pairs = []
        for row in reader:
            concept = clean_concept(row["concept"], what=f"concept in {path} line {reader.line_num}")
            anchor = re.sub(r"\s+", " ", row.get("anchor") or "").strip()
            pairs.append((concept, anchor))
    if not pairs:
        raise UserError(f"concepts file {path} lists no concepts")
    return pairs


def read_lines(path, what):
    """Read non-empty lines from a text file, one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def fill_template(template, text):
    return re.sub(r"\s+", " ", template.format(text)).strip(" ,")


def mentions(prompt, concept):
    """True when the concept appears in the prompt as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(concept.lower())}(?!\w)", prompt.lower()) is not None


# ----------------------------------------------------------------------------------------------------
# Prompt embeddings

@torch.no_grad()
def encode_sd_prompts(pipe, prompts, batch_size=32):
    """Encode prompts with the pipeline's own CLIP text encoder.

    Returns prompt_embeds (n, tokens, dim), the sequence the UNet attends to, and
    pooled_prompt_embeds (n, dim), the text encoder's output at the end-of-text token, which the
    hypernetwork reads.
    """
    device = pipe.text_encoder.device
    all_embeds, all_pooled = [], []
    for start in range(0, len(prompts), batch_size):
        tokens = pipe.tokenizer(
            list(prompts[start:start + batch_size]),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        output = pipe.text_encoder(tokens.input_ids.to(device))
        all_embeds.append(output.last_hidden_state)
        all_pooled.append(output.pooler_output)
    return torch.cat(all_embeds), torch.cat(all_pooled)


@torch.no_grad()
def encode_for_sampling(pipe, prompt, max_sequence_length=None):
    """Encode one prompt once, for both the pipeline call and the hypernetwork.

    Returns the keyword arguments that stand in for `prompt` in the pipeline call, and the pooled
    embedding (1, dim) the hypernetwork reads, so sampling runs the text encoders once per prompt.
    """
    if hasattr(pipe, "transformer") and pipe.transformer is not None:
        options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, **options)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}, pooled_prompt_embeds.float()
    prompt_embeds, pooled_prompt_embeds = encode_sd_prompts(pipe, [prompt])
    return {"prompt_embeds": prompt_embeds}, pooled_prompt_embeds.float()


@torch.no_grad()
def encode_pooled(pipe, prompts):
    """Return the pooled CLIP embedding (n, dim) that the hypernetwork reads, for SD or Flux."""
    if hasattr(pipe, "transformer") and pipe.transformer is not None:
        _, pooled_prompt_embeds, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None)
        return pooled_prompt_embeds.float()
    return encode_sd_prompts(pipe, prompts)[1].float()


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, network, config, step, optimizer=None, scaler=None, lr_scheduler=None):
    """Write the network, its configuration and the optimizer state atomically.

    The file is written next to its destination and renamed over it, so an interruption leaves
    either the old checkpoint or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "network": network.state_dict(),
        "config": config,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
    }
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    except BaseException:  # a failed or interrupted (Ctrl-C) write removes its partial temporary file
        temporary.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """Load a checkpoint with weights_only=True and check that it is one of ours."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"invalid checkpoint {path}: it is a folder; pass the .pt file inside it")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for damaged files
        raise UserError(f"invalid checkpoint {path}: the file is damaged or not a torch file ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"invalid checkpoint {path}: not an unhype checkpoint of format {CHECKPOINT_FORMAT_VERSION}")
    return checkpoint


def network_from_checkpoint(checkpoint):
    network = build_from_config(checkpoint["config"]["network"])
    network.load_state_dict(checkpoint["network"])
    return network.eval()


def check_checkpoint_fits(checkpoint, model_name, family, shapes, checkpoint_path):
    """Reject a checkpoint whose layers do not match the model, naming both."""
    config = checkpoint["config"]
    trained_for = f"{config['model']} ({config['family']}, target {config['target']})"
    if config["family"] != family:
        raise UserError(
            f"checkpoint {checkpoint_path} was trained for {trained_for}, a {FAMILY_NAMES[config['family']]} model, "
            f"but {model_name} is a {FAMILY_NAMES[family]} model"
        )
    expected = {name: tuple(shape) for name, shape in config["network"]["layer_shapes"].items()}
    for name, shape in expected.items():
        if tuple(shapes.get(name, ())) != shape:
            found = tuple(shapes[name]) if name in shapes else "no such layer"
            raise UserError(
                f"checkpoint {checkpoint_path} was trained for {trained_for} and does not fit {model_name}: "
                f"layer {name} is {shape} in the checkpoint and {found} in the model"
            )
    # The network writes factors only for its own layers, so an extra target layer would get none.
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UserError(
            f"checkpoint {checkpoint_path} was trained for {trained_for} and does not fit {model_name}: "
            f"the model has {len(unexpected)} target layers that the checkpoint lacks, e.g. {unexpected[0]}"
        )


def attach_checkpoint(pipe, checkpoint, checkpoint_path, model_name):
    """Inject the checkpoint's LoRA layers into a pipeline and return (layers, network)."""
    config = checkpoint["config"]
    denoiser = denoiser_of(pipe)
    family = "flux" if hasattr(pipe, "transformer") and pipe.transformer is not None else "sd"
    if config["family"] != family:
        check_checkpoint_fits(checkpoint, model_name, family, {}, checkpoint_path)
    try:
        layers = inject_lora(denoiser, config["target"], config["rank"], config["alpha"])
    except ValueError as error:
        raise UserError(f"checkpoint {checkpoint_path} does not fit {model_name}: {error}") from None
    check_checkpoint_fits(checkpoint, model_name, family, layer_shapes(layers), checkpoint_path)
    return layers, network_from_checkpoint(checkpoint).to(denoiser.device)


@torch.no_grad()
def generate_factors(network, pooled_prompt_embeds):
    """Run the hypernetwork once at the end of its trajectory, s = S: the LoRA used at inference."""
    steps = getattr(network, "trajectory_steps", 0)
    return network(pooled_prompt_embeds, steps)


def apply_factors(layers, factors, scale):
    """Hand generated factors to the LoRA layers and return each sample's LoRA strength ||dW||."""
    set_lora_factors(layers, factors)
    return lora_delta_norm(factors, scale)


# ----------------------------------------------------------------------------------------------------
# Side-by-side grids of base and erased images

GRID_MIN_CELL = 96  # cells are enlarged to at least this many pixels, so 16x16 toy images stay readable
GRID_LABEL_WIDTH = 360
GRID_GAP = 4
GRID_HEADER = 20


def labelled_grid(rows, column_titles):
    """Lay out rows of images in columns, each row labelled on the left and each column titled on top.

    rows: [(label lines, [one PIL image per column])]. Small images are enlarged by a whole factor, so
    toy pictures stay sharp.
    """
    cell = max(GRID_MIN_CELL, max(max(image.size) for _, images in rows for image in images))
    pitch = cell + GRID_GAP
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + len(column_titles) * pitch, GRID_HEADER + len(rows) * pitch), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(column_titles):
        draw.text((GRID_LABEL_WIDTH + column * pitch + 4, 4), title, fill="black")

    for row, (lines, images) in enumerate(rows):
        top = GRID_HEADER + row * pitch
        for index, line in enumerate(lines):
            draw.text((4, top + 4 + 16 * index), line[:56], fill="black")
        for column, image in enumerate(images):
            factor = max(1, cell // max(image.size))
            enlarged = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)
            grid.paste(enlarged, (GRID_LABEL_WIDTH + column * pitch, top))
    return grid


# ----------------------------------------------------------------------------------------------------
# Prompts for the toy world, whose captions name a colour and a shape

def toy_synonym_group(word):
    """Return every name of the toy shape or colour called `word`, or () if it is not a toy word."""
    import toy_world

    for names in list(toy_world.SHAPES.values()) + list(toy_world.COLOURS.values()):
        if word.lower() in names:
            return names
    return ()


def toy_concept_templates(concept):
    """Toy captions with {} in the slot the concept fills: the colour slot for a colour, else the shape."""
    import toy_world

    colours = [name for names in toy_world.COLOURS.values() for name in names]
    shapes = [name for names in toy_world.SHAPES.values() for name in names]
    is_colour = concept.lower() in colours
    templates = []
    for template in toy_world.TRAIN_TEMPLATES:
        if is_colour:
            templates += [template.format(colour="{}", shape=shape) for shape in shapes]
        else:
            templates += [template.format(colour=colour, shape="{}") for colour in colours]
    return templates


def toy_retain_prompts(concepts):
    """Return every training caption of the toy world that names none of the concepts nor their synonyms."""
    import toy_world

    excluded = set()
    for concept, _ in concepts:
        excluded.update(toy_synonym_group(concept) or (concept.lower(),))
    prompts = []
    for template in toy_world.TRAIN_TEMPLATES:
        for colour in (name for names in toy_world.COLOURS.values() for name in names):
            for shape in (name for names in toy_world.SHAPES.values() for name in names):
                if colour not in excluded and shape not in excluded:
                    prompts.append(toy_world.caption(template, colour, shape))
    return prompts
