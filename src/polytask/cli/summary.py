"""``polytask summary``: parameters (total and per component) and FLOPs of a config's network."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from polytask.cli.args import parse_tool_args
from polytask.config import instantiate
from polytask.models.summary import ModelSummary, summarize_model, training_resolution
from polytask.utils.files import write_json_atomic


def format_summary(summary: ModelSummary, name: str) -> str:
    """Human-readable lines: total and trainable parameters, per group, buffers, FLOPs."""
    lines = [
        f"{name}",
        f"  parameters: {summary.total_params:,} total, {summary.trainable_params:,} trainable",
        *(f"    {group}: {count:,}" for group, count in summary.groups.items()),
        f"  buffers: {summary.buffers:,} elements",
        f"  forward FLOPs at {summary.image_size[0]}x{summary.image_size[1]}, batch 1: "
        f"{summary.flops / 1e9:.2f} GFLOPs (2 per multiply-add)",
    ]
    return "\n".join(lines)


def main(args: Sequence[str]) -> int:
    """``polytask summary --config CFG [--config CFG2 ...] [--image-size H W] [--json OUT]``.

    Builds the config's network without training and prints its parameter counts (total and per
    ``param_groups()`` component) and forward FLOPs of one image at the training resolution
    (attention runs through PyTorch's math backend so that its matmuls are counted).
    Pretrained weights are not loaded (counts do not depend on them) unless ``--load-pretrained``.
    Without ``--config``, the main job's network (polytask's defaults). Other ``--key value``
    arguments are config overrides, as for ``polytask fit``.
    """
    parser = argparse.ArgumentParser(prog="polytask summary", description=main.__doc__)
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config (repeatable, applied in order over polytask's defaults)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resolution of the FLOP count (default: the config's training resolution)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--load-pretrained", action="store_true",
                        help="keep the config's pretrained setting (default: build with pretrained: false)")
    options, overrides = parse_tool_args(parser, args)

    if not options.load_pretrained:
        overrides = ["--model.net.init_args.pretrained=false", *overrides]
    cli = instantiate(options.config, overrides)
    net = cli.model.net
    size = tuple(options.image_size) if options.image_size else training_resolution(net, cli.datamodule)
    if size is None:
        parser.error("the config does not say its training resolution; give --image-size H W")
    summary = summarize_model(net, size)
    name = f"{net.display_name} ({', '.join(options.config) or 'polytask defaults'})"
    print(format_summary(summary, name))
    if options.json:
        payload = {"configs": list(options.config), "net": net.display_name, **summary.as_dict()}
        write_json_atomic(Path(options.json), payload)
    return 0
