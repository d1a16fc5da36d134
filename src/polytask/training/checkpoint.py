"""Safe checkpoint files: atomic writes, weights-only reads, config checks and safetensors export.

* :class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` plugin of every polytask run: a
  checkpoint is written to a temporary file in its own folder, flushed to disk (``fsync``) and
  renamed over the target (``os.replace``), so a process killed while saving leaves the previous
  file intact. Every checkpoint is read with ``torch.load(weights_only=True)``, which refuses
  pickled Python objects (code execution), and is checked before writing to hold only tensors
  and plain values, so it can always be read back that way.
* :class:`ResumableCheckpoint` is Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` holds the
  final model and whose ``ckpt_path="last"`` also finds the ``last.ckpt`` of earlier runs (earlier
  logger versions); :func:`last_checkpoints` lists what ``ckpt_path="last"`` can resume from.
* :func:`state_dict_mismatch` lists what differs between a checkpoint and a model;
  :class:`CheckpointMismatchError` reports it with the configs involved.
* :func:`export_safetensors` (``polytask export``) and :func:`load_weights`
  move network weights in and out of ``.safetensors`` files.
* :func:`rng_state` / :func:`restore_rng_state` carry the global random generators through a
  checkpoint as tensors and plain values.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from polytask.utils.files import atomic_write

CHECKPOINT_KEY = "polytask"
"""Key of polytask's own entry in a Lightning checkpoint: ``{"config": JSON str, "rng": ..., "guard": ...}``."""

NET_PREFIX = "net."
"""Prefix of the network's parameters in the state dict of a :class:`~polytask.training.MultiTaskModule`."""

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_PLAIN_LEAVES = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, set, torch.Size)
_MAX_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects that ``torch.load(weights_only=True)`` refuses."""


class CheckpointMismatchError(CheckpointError):
    """The tensors of a checkpoint do not match the model's (other tasks, network or options)."""


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Raise :class:`UnsafeCheckpointError` unless ``value`` holds only tensors and plain values.

    Plain: ``int``, ``float``, ``bool``, ``str``, ``bytes``, ``complex``, ``None``, dtypes and devices,
    in dicts, lists, tuples and sets; exactly what ``torch.load(weights_only=True)`` accepts.

    Args:
        value: the object to check (e.g. a whole Lightning checkpoint dict).
        where: its name in the message; nested values are named by their key path.
    """
    if type(value) in _PLAIN_TENSORS or type(value) in _PLAIN_LEAVES:
        return
    if type(value) in _PLAIN_CONTAINERS:
        if isinstance(value, dict):
            for key, item in value.items():
                check_plain(key, f"{where} (key {key!r})")
                check_plain(item, f"{where}[{key!r}]")
        else:
            for i, item in enumerate(value):
                check_plain(item, f"{where}[{i}]")
        return
    raise UnsafeCheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a weights-only checkpoint "
        "cannot hold (only tensors, numbers, strings, None and dicts/lists/tuples/sets of them); "
        "store plain values instead (e.g. save_hyperparameters of plain types, a class path as a str)"
    )


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        mmap: map the tensors' storage instead of reading it (cheap when only plain values are needed).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        UnsafeCheckpointError: the file holds pickled Python objects (refused, nothing is executed).
        CheckpointError: the file is not a readable checkpoint (truncated, corrupt, not a dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if file_kind(path) == "safetensors":
        raise CheckpointError(
            f"{path} is a safetensors file of network weights, not a Lightning checkpoint: it holds no optimizer "
            "state or training position to resume from. Load it with --weights "
            f"{path} (validate, test and predict also take it as --ckpt_path; fit starts from it with --weights)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds pickled Python objects besides tensors and plain values, "
            f"which could run arbitrary code ({_torch_reason(err)}); polytask only loads weights-only "
            "checkpoints; export the weights of a trusted file with `polytask export`"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {_torch_reason(err)}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a checkpoint dict")
    return checkpoint


def file_kind(path: str | Path) -> Literal["torch", "safetensors", "other"]:
    """What a weights file is, from its first bytes: a ``torch.save`` file (zip or legacy pickle),
    a safetensors file (8-byte little-endian header length, then the JSON header), or something else."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return "other"


def _torch_reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (not its advice to disable ``weights_only``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (specific or lines or [type(err).__name__])[0]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, fsync'ed local writes and weights-only reads.

    Local checkpoints go through :func:`atomic_write` after :func:`check_plain`; remote ones
    (``s3://``...) use Lightning's own writer. Reads always use ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        check_plain(checkpoint, f"checkpoint {path}")
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (saving {path})")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            rank_zero_warn(f"weights_only=False ignored: polytask loads every checkpoint weights-only ({path})")
        if _is_remote(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(path, map_location)


def _is_remote(path: str | Path) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the final model and is found again by
    ``ckpt_path="last"`` in every version of the run's logger.

    * **Found again.** Lightning's ``ModelCheckpoint`` looks for ``last.ckpt`` only in the
      checkpoint folder of the *new* logger version, so ``polytask fit --ckpt_path last`` would
      silently start from scratch. When no ``dirpath`` is given, this callback also searches
      ``<logger save_dir>/<logger name>/*/checkpoints`` (:meth:`runs_root`) and Lightning
      resumes from the newest.
    * **The final model.** Lightning writes ``last.ckpt`` when training ends only if it saved
      nothing earlier, so the steps after the last periodic save (``every_n_train_steps``) were
      missing from it. With ``save_last``, this callback writes it when training ends whenever the
      final step is not saved yet (through the trainer's ``CheckpointIO``: atomically with
      :class:`AtomicCheckpointIO`).

    Takes the arguments of ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fixed_dirpath = self.dirpath is not None

    def runs_root(self, trainer: Any) -> Path | None:
        """The folder of the logger's versions, ``<save_dir>/<name>``, whose ``*/checkpoints`` are searched
        for ``last.ckpt`` besides the new run's own folder (``None`` with a fixed ``dirpath`` or no logger)."""
        if self._fixed_dirpath or not trainer.loggers:
            return None
        logger = trainer.loggers[0]
        return Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        root = self.runs_root(trainer)
        return found if root is None else found | last_files(root)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write ``last.ckpt`` at the final step unless a save of that step happened already."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def last_files(root: str | Path) -> set[str]:
    """The ``last.ckpt`` (and ``last-N.ckpt``) files of every run under ``root``: ``root/*/checkpoints/``."""
    name, suffix = ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION
    pattern = re.compile(rf"^{re.escape(name)}(-\d+)?{re.escape(suffix)}$")
    return {os.path.normpath(p) for p in Path(root).glob("*/checkpoints/*") if pattern.match(p.name)}


def newest(paths: Sequence[str]) -> str | None:
    """The most recently modified of ``paths`` (Lightning's choice among ``last`` candidates), None if empty."""
    return max(paths, key=lambda p: get_filesystem(p).modified(p), default=None)


def last_checkpoints(trainer: Any) -> list[str]:
    """The existing files among which ``ckpt_path="last"`` chooses (Lightning takes the newest).

    The candidates are Lightning's own: the ``last*.ckpt`` files that the trainer's
    ``ModelCheckpoint`` callbacks find (see :class:`ResumableCheckpoint`) and the files of its
    ``OnExceptionCheckpoint`` callbacks.
    """
    candidates = {getattr(c, "ckpt_path", None) for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= callback._find_last_checkpoints(trainer)
    return sorted(p for p in candidates if p and get_filesystem(p).exists(p))


def describe_last_search(trainer: Any) -> str:
    """Where ``ckpt_path="last"`` looks, in words, for an error message."""
    places = []
    for callback in trainer.checkpoint_callbacks:
        root = callback.runs_root(trainer) if isinstance(callback, ResumableCheckpoint) else None
        if root is not None:
            places.append(f"{type(callback).__name__} searched {root}/*/checkpoints/last*.ckpt")
        elif isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            places.append(f"{type(callback).__name__} searched {callback.dirpath}")
        elif isinstance(callback, ModelCheckpoint):
            places.append(
                f"{type(callback).__name__} searched only the new run's own folder; "
                "use polytask.training.checkpoint.ResumableCheckpoint to search earlier runs"
            )
    return "; ".join(places) or "no checkpoint callback in trainer.callbacks"


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], shapes_only: bool = False
) -> list[str]:
    """What keeps ``found`` (a checkpoint) from loading into a model whose state dict is ``expected``.

    Returns:
        One line per problem: keys missing from the checkpoint and unexpected keys (unless
        ``shapes_only``; keys sharing their first three dotted parts are grouped), and shape
        differences; at most 20 lines per kind; empty when the checkpoint fits.
    """
    missing = _grouped([k for k in expected if k not in found])
    unexpected = _grouped([k for k in found if k not in expected])
    shapes = [
        f"shape of {k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    kinds = [("shape", shapes)]
    if not shapes_only:
        kinds = [("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected), *kinds]
    problems: list[str] = []
    for kind, items in kinds:
        problems += [item if kind == "shape" else f"{kind}: {item}" for item in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
            problems.append(f"... and {len(items) - _MAX_LISTED} more ({kind})")
    return problems


def _grouped(keys: Sequence[str]) -> list[str]:
    """Keys, those sharing their first three dotted parts as one ``prefix.* (N keys)`` entry."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(".".join(key.split(".")[:3]), []).append(key)
    return [members[0] if len(members) == 1 else f"{prefix}.* ({len(members)} keys)" for prefix, members in groups.items()]


def mismatch_error(source: str, problems: Sequence[str], file_config: str | None, model_config: str) -> CheckpointMismatchError:
    """The error for a checkpoint/weights file ``source`` that does not fit a model.

    Args:
        source: the file (path) being loaded.
        problems: lines from :func:`state_dict_mismatch`.
        file_config: JSON description of the model the file was saved from (``None`` if unknown).
        model_config: JSON description of the model being loaded into.
    """
    listed = "\n  ".join(problems)
    return CheckpointMismatchError(
        f"{source} does not fit this model (different tasks, network or options?):\n  {listed}\n"
        f"config of the checkpoint: {file_config or 'not recorded'}\n"
        f"config of the model:      {model_config}"
    )


def describe_net(net: nn.Module) -> dict[str, Any]:
    """Plain description of a network: class path and, for a MultiTaskNet, its tasks."""
    out: dict[str, Any] = {"class": f"{type(net).__module__}.{type(net).__qualname__}"}
    tasks = getattr(net, "tasks", None)
    if tasks is not None:
        out["tasks"] = [{"name": t.name, "type": type(t).__name__, "out_channels": t.out_channels} for t in tasks]
    return out


def net_state_dict(checkpoint: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The network's tensors of a Lightning checkpoint (``state_dict`` keys under ``net.``, prefix removed)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} has no 'state_dict': not a Lightning checkpoint")
    weights = {k[len(NET_PREFIX) :]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    if not weights:
        raise CheckpointError(f"{source} holds no network weights (no state_dict key starts with {NET_PREFIX!r})")
    return weights


def checkpoint_config(checkpoint: Mapping[str, Any]) -> str | None:
    """The JSON model config recorded by polytask in a checkpoint, if any."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    return entry.get("config") if isinstance(entry, Mapping) else None


def export_safetensors(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write the network weights of a Lightning checkpoint to a ``.safetensors`` file (atomically).

    Keys are the network's own (``backbone...``, ``heads...``, without ``net.``); the file's
    metadata records the model config (``polytask_config``, JSON), the source file, epoch and step.

    Returns:
        ``out_path``.
    """
    source = str(checkpoint_path)
    checkpoint = read_checkpoint(checkpoint_path)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in net_state_dict(checkpoint, source).items()}
    metadata = {
        "format": "pt",
        "source": Path(source).name,
        "epoch": str(checkpoint.get("epoch", "")),
        "global_step": str(checkpoint.get("global_step", "")),
        "polytask_config": checkpoint_config(checkpoint) or "",
    }
    payload = safetensors_bytes(weights, metadata=metadata)
    return atomic_write(out_path, lambda f: f.write(payload))


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None, tuple[int, int] | None]:
    """Network weights, recorded JSON config and ``(epoch, global step)`` of a ``.safetensors`` file
    or a Lightning checkpoint; the kind is told by the file's content, not its name.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: neither kind, or unreadable, or without network weights; the message says
            what the file is instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    kind = file_kind(path)
    if kind == "torch":
        checkpoint = read_checkpoint(path)
        position = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))
        return net_state_dict(checkpoint, str(path)), checkpoint_config(checkpoint), position
    if kind == "other":
        raise CheckpointError(
            f"{path} is neither a safetensors file nor a torch checkpoint (expected the .safetensors of `polytask "
            "export` or a .ckpt written by `polytask fit`)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        weights = load_safetensors(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError for bad files
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    epoch, step = metadata.get("epoch", ""), metadata.get("global_step", "")
    position = (int(epoch), int(step)) if epoch.isdigit() and step.isdigit() else None
    return weights, metadata.get("polytask_config") or None, position


def load_weights(module_or_net: nn.Module, path: str | Path) -> nn.Module:
    """Load network weights from ``path`` (``.safetensors`` or a Lightning ``.ckpt``) in place.

    Args:
        module_or_net: a :class:`~polytask.training.MultiTaskModule` (its ``net`` is loaded) or a network.
        path: file written by :func:`export_safetensors` or by training.

    Returns:
        The loaded network.

    Raises:
        CheckpointMismatchError: keys or shapes differ; the message lists them and both configs.
    """
    net = getattr(module_or_net, "net", module_or_net)
    weights, file_config, position = read_weights(path)
    problems = state_dict_mismatch(net.state_dict(), weights)
    if problems:
        model_config = getattr(module_or_net, "config_json", None) or json.dumps(describe_net(net))
        raise mismatch_error(str(path), problems, file_config, model_config)
    net.load_state_dict(weights)
    if position is not None and hasattr(module_or_net, "loaded_position"):
        module_or_net.loaded_position = position
    return net


def rng_state() -> dict[str, Any]:
    """The state of torch's (CPU and CUDA), NumPy's and Python's global generators, as plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state` (CUDA states only when the devices match)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(state["python"])
