"""``polytask experts``: TaskExpert's dominant-expert maps of one image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from polytask.cli.args import parse_tool_args
from polytask.config import instantiate
from polytask.data.predict import BadImageError, load_image, normalise
from polytask.data.transforms import denormalize
from polytask.diagnostics.expert_usage import dominant_expert_maps, gate_recorder_of, plot_dominant_experts
from polytask.training.checkpoint import load_weights
from polytask.viz import image_to_uint8


def _load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file resized to ``size`` ``(H, W)`` and normalised as in training: ``(3, H, W)``.

    Raises:
        BadImageError: the file is missing, not an image, or unusable (the reason is named).
    """
    file = Path(path)
    if not file.is_file():
        raise BadImageError(file, "no such file")
    rgb, _ = load_image(file)
    return normalise(rgb.resize((size[1], size[0]), Image.BILINEAR))


def main(args: Sequence[str]) -> int:
    """``polytask experts``: dominant-expert maps of one image for a config (and checkpoint).

    Without ``--config``, the main job's network (polytask's defaults). Other ``--key value``
    arguments are config overrides, as for ``polytask fit``.
    """
    parser = argparse.ArgumentParser(prog="polytask experts", description=main.__doc__)
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, applied in order over polytask's defaults)")
    parser.add_argument(
        "--ckpt_path",
        "--weights",
        dest="ckpt_path",
        help="weights to load: a Lightning checkpoint or exported .safetensors (default: the config's initial weights)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file (resized to the network's resolution)")
    source.add_argument("--index", type=int, help="index of a sample of the datamodule's validation split")
    parser.add_argument("--out", required=True, help="PNG file to write")
    options, overrides = parse_tool_args(parser, args)
    cli = instantiate(options.config, overrides)
    module = cli.model
    if options.ckpt_path:
        load_weights(module, options.ckpt_path)
    net = gate_recorder_of(module)
    if net is None:
        parser.error(f"the network of {options.config} has no learned gate weights to show (none, or fixed ones)")
    if options.image:
        size = getattr(net, "image_size", None)
        if size is None:
            parser.error("--image needs a network with an image_size; use --index")
        try:
            image = _load_image(options.image, size)
        except BadImageError as err:
            parser.error(f"--image {err}")
    else:
        image = cli.datamodule.make_dataset("val")[options.index]["image"]
    maps = dominant_expert_maps(net, image)
    out = plot_dominant_experts(image_to_uint8(denormalize(image)), maps, net.gate_slot_names(), net.mmoe_blocks, options.out)
    print(f"dominant-expert maps written to {out}")
    return 0
