"""``polytask export``: the network weights of a checkpoint as a safetensors file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from polytask.training.checkpoint import CheckpointError, export_safetensors


def main(args: Sequence[str]) -> int:
    """``polytask export --ckpt_path RUN.ckpt --out WEIGHTS.safetensors``: network weights to safetensors."""
    parser = argparse.ArgumentParser(prog="polytask export", description=main.__doc__)
    parser.add_argument("--ckpt_path", "--ckpt", dest="ckpt", required=True, help="Lightning checkpoint written by `polytask fit`")
    parser.add_argument("--out", help="output .safetensors file (default: the checkpoint's name with .safetensors)")
    options = parser.parse_args(list(args))
    out = Path(options.out) if options.out else Path(options.ckpt).with_suffix(".safetensors")
    if out.suffix != ".safetensors":
        parser.error(f"--out {out}: expected a .safetensors file name")
    try:
        export_safetensors(options.ckpt, out)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"polytask export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {options.ckpt}")
    return 0
