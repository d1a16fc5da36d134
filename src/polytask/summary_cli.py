"""``polytask summary``: parameters (total and per component) and FLOPs of a config's network."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


from polytask.summary import ModelSummary, summarize, training_resolution


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


def summary_main(args: Sequence[str]) -> int:
    """``polytask summary --config CFG [--config CFG2 ...] [--image-size H W] [--json OUT]``.

    Builds the config's network without training and prints its parameter counts (total and per
    ``param_groups()`` component) and forward FLOPs of one image at the training resolution
    (attention runs through PyTorch's math backend so that its matmuls are counted).
    Pretrained weights are not loaded (counts do not depend on them) unless ``--load-pretrained``.
    Unknown ``--key value`` arguments are passed to the config as overrides.
    """
    parser = argparse.ArgumentParser(prog="polytask summary", description=summary_main.__doc__)
    parser.add_argument("--config", action="append", required=True, help="YAML config (repeatable, applied in order)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resolution of the FLOP count (default: the config's training resolution)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--load-pretrained", action="store_true",
                        help="keep the config's pretrained setting (default: build with pretrained: false)")
    options, overrides = parser.parse_known_args(list(args))

    from polytask.cli import instantiate

    if not options.load_pretrained:
        overrides = ["--model.net.init_args.pretrained=false", *overrides]
    cli = instantiate(options.config, overrides)
    net = cli.model.net
    size = tuple(options.image_size) if options.image_size else training_resolution(net, cli.datamodule)
    if size is None:
        parser.error("the config does not say its training resolution; give --image-size H W")
    summary = summarize(net, size)
    name = f"{type(net).__name__} ({', '.join(options.config)})"
    print(format_summary(summary, name))
    if options.json:
        path = Path(options.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"configs": list(options.config), "net": type(net).__name__, **summary.as_dict()}
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
