"""DDP on 2 CPU processes (gloo) trains exactly like one process holding the whole batch.

Each comparison runs ``polytask fit`` of one config twice: in this process with batch 4, and with
``configs/trainer/ddp_cpu.yaml`` as 2 processes of batch 2 (for hard sharing Lightning starts the
second process, as for a user's ``polytask fit --trainer.devices 2``; the other networks' two
processes are started together, as torchrun does, which saves the second process's start-up
after the first's). After one epoch (2 batches) the
validation metrics agree to 1e-5 relative and every weight and buffer to 1e-5. It is checked for
hard sharing (the default network), TaskExpert, and ETR-NLP trained batched and per task (one
optimizer step per task: its gradients are averaged by :class:`~polytask.training.PerTaskModule`,
not by DDP's reducer). What makes the runs equal:

* the same images in every step: the datamodule's training sampler shards one permutation of
  ``(seed, epoch)`` by rank (rank ``r`` takes positions ``r, r + 2, ...``), so the two ranks of
  a step hold the four images of the one-process step; no flip augmentation;
* batch statistics over the 4 images: :class:`GlooBatchNormSync` below turns every
  ``BatchNorm2d`` and ETR-NLP ``TaskBatchNorm`` into a version whose statistics are all-reduced
  (torch's ``SyncBatchNorm`` runs on GPUs only: DDP refuses it on CPU modules);
* losses that are means over equal counts, so the average of the per-process gradients is
  the gradient of the whole batch: semseg (no ignored pixels in SynthScenes), depth (every
  pixel valid), normals and edge. Saliency is left out (its class weights are balanced per
  batch) and so are human parts (255 on whole images without a box: unequal valid counts);
  TaskExpert without its load-balancing loss and gate noise (both per-process batch statistics);
* metrics as sums synced by torchmetrics at ``compute()`` over validation splits that divide
  evenly between the ranks (no padding duplicates);
* float64 (``precision: 64-true``): the two runs sum in different orders, and in float32 the
  rounding differences grow through the steps of the untrained network. Measured with the hard
  sharing test in float32 (then 4 batches of 32x48 images): metrics within 9e-9 relative, weights
  within 5.3e-5 (Adam, lr 1e-3; with SGD, lr 0.05: 2.3e-5). In float64 both agreed to 1.4e-13.

Every multi-process run here goes through :func:`run_ddp`, which turns a hang (a collective that
one rank never joins) into a test failure showing the stack of every process, not a stuck test
run. ``tests/test_ddp_matrix.py`` uses it too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn

from conftest import CONFIGS, REPO, TINY_HARD_SHARING, TINY_SEGNET, TINY_TASKEXPERT
from polytask.models.etr_nlp.layers import TaskBatchNorm

DDP_CPU = CONFIGS / "trainer" / "ddp_cpu.yaml"
TASKS = ["semseg", "depth", "normals", "edge"]
IMAGE_SIZE = (32, 32)
NUM_TRAIN, NUM_VAL, TOTAL_BATCH = 8, 4, 4
HANG_TIMEOUT_S = float(os.environ.get("POLYTASK_DDP_TEST_TIMEOUT", "300"))
"""Seconds a :func:`run_ddp` run may take before its processes dump their stacks and are killed
(``$POLYTASK_DDP_TEST_TIMEOUT``, default 300)."""


# --- running several processes -------------------------------------------------------------


def _rank_main(argv: Sequence[str]) -> None:
    """Body of one process of :func:`run_ddp`: ``COMMANDS_JSON``, a list of ``polytask`` commands.

    Installs ``faulthandler`` so that a crash, or the ``SIGUSR1`` that :func:`run_ddp` sends when
    the run takes too long, writes the stack of every thread to stderr; then runs the commands in
    order. The argument ``@last`` of a command stands for the newest ``last.ckpt`` under the
    working directory.
    """
    import faulthandler
    import glob

    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from polytask.cli import main

    for command in json.loads(argv[0]):
        if "@last" in command:
            found = sorted(glob.glob("**/last.ckpt", recursive=True), key=os.path.getmtime)
            if not found:
                sys.exit(f"no last.ckpt under {os.getcwd()} to resume from")
            command = [found[-1] if arg == "@last" else arg for arg in command]
        main(command)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ddp(
    commands: Sequence[Sequence[str]],
    cwd: Path,
    world_size: int = 2,
    launcher: str = "external",
    timeout_s: float = HANG_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``polytask`` commands on ``world_size`` processes; fail the test unless every process succeeds.

    A run still going after ``timeout_s`` (a hang: a collective that some rank never joins)
    gets ``SIGUSR1`` in every process, which writes the stack of each of its threads to its log
    (:func:`_rank_main`), and is then killed; the test fails showing those stacks.

    Args:
        commands: argument lists of ``polytask`` (``["fit", "--config", ...]``), run in order by
            every process (a second ``fit`` in the same processes reuses their process group).
        cwd: working directory of the processes; their logs go to ``cwd/rank<r>.log``.
        world_size: number of processes.
        launcher: ``external``: this function starts every process with ``LOCAL_RANK`` set (as
            torchrun does); ``lightning``: it starts rank 0 and Lightning starts the others
            (one command only, as ``polytask fit --trainer.devices N`` does; their output goes
            to rank 0's log).
        timeout_s: seconds the whole run may take.
        env: extra environment variables.

    Returns:
        The logs of the processes, joined.
    """
    if launcher not in ("external", "lightning"):
        raise ValueError(f"unknown launcher {launcher!r}")
    if launcher == "lightning" and len(commands) != 1:
        raise ValueError("Lightning's launcher starts the other processes for one command only")
    base_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    argv = [sys.executable, str(Path(__file__).resolve()), json.dumps([list(c) for c in commands])]
    ranks = range(world_size) if launcher == "external" else range(1)
    logs = [cwd / f"rank{rank}.log" for rank in ranks]
    processes = []
    for rank, log in zip(ranks, logs):
        rank_env = dict(base_env)
        if launcher == "external":
            rank_env.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
        with log.open("w") as out:  # a session per process: its signals reach the processes it starts
            processes.append(subprocess.Popen(argv, cwd=cwd, env=rank_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    hung = False
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        _signal_groups(processes, signal.SIGUSR1)
        time.sleep(5.0)
        _signal_groups(processes, signal.SIGKILL)
    codes = [process.wait() for process in processes]
    texts = [log.read_text(errors="replace") for log in logs]
    if hung or any(codes):
        report = "\n".join(
            f"===== rank {rank} (exit status {code}), last lines of {log} =====\n{text[-12000:]}"
            for rank, code, log, text in zip(ranks, codes, logs, texts)
        )
        what = f"hung: still running after {timeout_s:.0f} s; the stacks of every process follow" if hung else "failed"
        pytest.fail(f"{world_size}-process run {what}\n{report}", pytrace=False)
    return "\n".join(texts)


def _signal_groups(processes: Sequence[subprocess.Popen], signum: int) -> None:
    """Send ``signum`` to the process group (session) of each of ``processes`` that still runs."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:  # ended meanwhile
                pass


# --- batch norm over all processes ---------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient is summed over the processes too."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _distributed_training(module: nn.Module) -> bool:
    return module.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode ``F.batch_norm`` of ``(B, C, H, W)`` with the statistics of every process's batch.

    Mean and variance come from differentiable all-reduces of per-channel sums (two passes:
    the sums, then the squared deviations), so gradients flow through the global statistics as
    in torch's ``SyncBatchNorm``. The running statistics, when given, are updated in place.
    """
    channels = x.shape[1]
    count = _AllReduceSum.apply(x.new_tensor([x.numel() / channels]))
    mean = _AllReduceSum.apply(x.sum(dim=(0, 2, 3))) / count
    centred = x - mean.view(1, -1, 1, 1)
    var = _AllReduceSum.apply(centred.pow(2).sum(dim=(0, 2, 3))) / count
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * count / (count - 1), momentum)
    y = centred * torch.rsqrt(var + eps).view(1, -1, 1, 1)
    if weight is not None and bias is not None:
        y = y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the batch of all processes (works on CPU/gloo).

    Outside training or distributed runs it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        if not _distributed_training(self):
            return super().forward(x)
        if self.track_running_stats:
            self.num_batches_tracked += 1
        return global_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.momentum, self.eps)


class GlooSyncTaskBatchNorm(TaskBatchNorm):
    """ETR-NLP's ``TaskBatchNorm`` normalising each task block with its statistics over all processes."""

    def normalize(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """``(B, C, H, W)`` of task ``task`` -> same shape, as ``TaskBatchNorm.normalize`` with global statistics."""
        if not _distributed_training(self):
            return super().normalize(x, task)
        weight = self.weight[task] if self.weight is not None else None
        bias = self.bias[task] if self.bias is not None else None
        if self.running_mean is None or self.running_var is None or self.num_batches_tracked is None:
            return global_batch_norm(x, None, None, weight, bias, self.momentum, self.eps)
        self.num_batches_tracked[task] += 1
        # rows of the (T, C) buffers are views: updated in place
        return global_batch_norm(x, self.running_mean[task], self.running_var[task], weight, bias, self.momentum, self.eps)


_SYNCED = {nn.BatchNorm2d: GlooSyncBatchNorm, TaskBatchNorm: GlooSyncTaskBatchNorm}


class GlooBatchNormSync(LayerSync):
    """Lightning ``LayerSync`` plugin: ``BatchNorm2d`` and ``TaskBatchNorm`` layers (exact types) get
    their ``Gloo*`` versions above; ``revert`` undoes it. Parameters and buffers stay in place."""

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if type(module) in _SYNCED:
                module.__class__ = _SYNCED[type(module)]
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        plain = {synced: base for base, synced in _SYNCED.items()}
        for module in model.modules():
            if type(module) in plain:
                module.__class__ = plain[type(module)]
        return model


# --- per-task gradient averaging -------------------------------------------------------------


def _average_in_process(rank: int, port: int, results: Any) -> None:
    """One of 2 gloo processes: gradients ``rank + 1`` on parameters 0 and 2, averaged; then rank 1
    also holds a gradient on parameter 1, which must raise on both processes."""
    from polytask.training import GradientMismatchError, all_reduce_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parameters = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))]
        for i in (0, 2):
            parameters[i].grad = torch.full_like(parameters[i], float(rank + 1))
        all_reduce_gradients(parameters, "matching step")
        results.put((rank, "averaged", [None if p.grad is None else p.grad.tolist() for p in parameters]))
        if rank == 1:
            parameters[1].grad = torch.ones(2)
        try:
            all_reduce_gradients(parameters, "mismatched step")
        except GradientMismatchError as err:
            results.put((rank, "mismatch", str(err)))
    finally:
        dist.destroy_process_group()


def test_per_task_gradients_are_averaged_and_a_mismatch_raises_on_every_process() -> None:
    import torch.multiprocessing as mp

    context = mp.get_context("fork")  # the children inherit torch and polytask: spawn imported them anew (~10 s)
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_average_in_process, args=(r, port, results)) for r in range(2)]
    for process in processes:
        process.start()
    outcomes = sorted((results.get(timeout=HANG_TIMEOUT_S) for _ in range(4)), key=lambda o: (o[1], o[0]))
    for process in processes:
        process.join(timeout=60)
    expected = [[1.5] * 3, None, [[1.5, 1.5], [1.5, 1.5]]]
    assert outcomes[:2] == [(0, "averaged", expected), (1, "averaged", expected)]
    assert [o[:2] for o in outcomes[2:]] == [(0, "mismatch"), (1, "mismatch")]
    assert "mismatched step" in outcomes[2][2] and "different parameters" in outcomes[2][2]


# --- the equivalence tests -------------------------------------------------------------------

HARD_SHARING = {"class_path": "polytask.models.HardSharing", "init_args": TINY_HARD_SHARING}
TASKEXPERT = {"class_path": "polytask.models.taskexpert.TaskExpert", "init_args": TINY_TASKEXPERT}  # a ViT for 32x32 images
ETR_NLP = {"class_path": "polytask.models.etr_nlp.RoutedSegNet", "init_args": {"routing": "etr_nlp", **TINY_SEGNET}}
MULTI_TASK_MODULE = "polytask.training.MultiTaskModule"
UPGRAD = {"class_path": "polytask.weighting.GradientAggregation", "init_args": {"aggregator": "upgrad"}}
PER_TASK_MODULE = "polytask.training.PerTaskModule"

EQUIVALENCE_CASES = {
    "hard_sharing": (HARD_SHARING, MULTI_TASK_MODULE, None),
    "hard_sharing_famo": (HARD_SHARING, MULTI_TASK_MODULE, {"class_path": "polytask.weighting.FAMO"}),
    "hard_sharing_dwa": (HARD_SHARING, MULTI_TASK_MODULE, {"class_path": "polytask.weighting.DynamicWeightAverage"}),
    "hard_sharing_gradnorm": (HARD_SHARING, MULTI_TASK_MODULE, {"class_path": "polytask.weighting.GradNorm"}),
    "hard_sharing_upgrad": (HARD_SHARING, MULTI_TASK_MODULE, UPGRAD),
    "hard_sharing_upgrad_representation": (
        HARD_SHARING,
        MULTI_TASK_MODULE,
        {"class_path": UPGRAD["class_path"], "init_args": {"aggregator": "upgrad", "form": "representation"}},
    ),
    "taskexpert": (TASKEXPERT, MULTI_TASK_MODULE, None),
    "etr_nlp_batched": (ETR_NLP, MULTI_TASK_MODULE, None),
    "etr_nlp_per_task": (ETR_NLP, PER_TASK_MODULE, None),
}
"""Network, module and loss weighting (None: the fixed weights) of each 2-process equivalence case;
``hard_sharing_famo``: a strategy whose weights and state depend on the losses of every process, and
the task-interference callback, whose per-task gradients are averaged over the processes;
``hard_sharing_dwa``: running loss sums of losses averaged over the processes;
``hard_sharing_gradnorm``: learnt weights trained on per-task gradient norms averaged over the processes;
``hard_sharing_upgrad``: gradient aggregation on the Jacobian of the shared parameters, averaged
over the processes before aggregating (DDP's own averaging is off); ``..._representation``: on the
Jacobian of the shared representation, through its Gramian summed over the processes."""


def _write_config(
    path: Path, out_dir: Path, cache_dir: Path, batch_size: int, net: dict, module: str, weighting: dict | None = None
) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "deterministic": True,
            "precision": "64-true",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": None if module == PER_TASK_MODULE else 10.0,
            "plugins": [{"class_path": "test_ddp.GlooBatchNormSync"}],
            "callbacks": [
                {"class_path": "polytask.training.MetricReport", "init_args": {"json_dir": str(out_dir)}},
                *(
                    [
                        {
                            "class_path": "polytask.diagnostics.TaskInterference",
                            "init_args": {"every_n_steps": 1, "out_dir": str(out_dir / "interference")},
                        }
                    ]
                    if weighting
                    else []
                ),
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(out_dir), "save_last": True, "save_top_k": 0},
                },
            ],
        },
        "model": {
            "class_path": module,
            "init_args": {
                "net": net,
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 3e-3}},
                "lr_schedule": "poly",
                **({"weighting": weighting} if weighting else {}),
            },
        },
        "data": {
            "class_path": "polytask.data.SynthScenesDataModule",
            "init_args": {
                "tasks": TASKS,
                "num_train": NUM_TRAIN,
                "num_val": NUM_VAL,
                "image_size": list(IMAGE_SIZE),
                "flip": False,
                "cache_dir": str(cache_dir),
                "batch_size": batch_size,
            },
        },
    }
    path.write_text(json.dumps(config))


def _results(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validation results and final state dict written by a run into ``out_dir``."""
    results = json.loads((out_dir / "val_metrics.json").read_text())["results"]
    state = torch.load(out_dir / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return results, state


def _initial_state(config: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict a run of ``config`` starts from (built by the same CLI, seed included) and the
    names of its trainable parameters."""
    from polytask.config import instantiate

    model = instantiate([str(config)]).model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return {k: v.clone() for k, v in model.state_dict().items()}, trainable


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthScenes splits rendered once, before the processes start."""
    from polytask.data.datasets.synthscenes import SynthScenes

    cache = tmp_path_factory.mktemp("cache")
    for split, size in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        SynthScenes(split, size, IMAGE_SIZE, tasks=TASKS, cache_dir=cache).prepare()
    return cache


def test_gloo_sync_batchnorms_are_plain_outside_distributed_runs() -> None:
    from polytask.models.etr_nlp.stacked_batch import TaskRouter

    x = torch.randn(4, 3, 5, 6)
    router = TaskRouter(2)
    model = nn.Sequential(nn.BatchNorm2d(3), TaskBatchNorm(router, 3))
    with router.route([1, 0]):
        plain = model(x)
        GlooBatchNormSync().apply(model)
        assert [type(m) for m in model] == [GlooSyncBatchNorm, GlooSyncTaskBatchNorm]
        torch.testing.assert_close(model(x), plain)
    GlooBatchNormSync().revert(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, TaskBatchNorm]


LIGHTNING_LAUNCHED = (
    "hard_sharing",
    "hard_sharing_famo",
    "hard_sharing_dwa",
    "hard_sharing_gradnorm",
    "hard_sharing_upgrad",
    "hard_sharing_upgrad_representation",
)
"""Cases whose second process Lightning starts (the launcher does not depend on the network)."""
SLOW_EQUIVALENCE = ("etr_nlp_batched",)
"""Cases kept out of the default run: ETR-NLP's batched DDP path is plain DDP (as hard sharing's), and
its per-task case trains the same network; ETR-NLP's routed convolutions are slow in float64 on CPU."""


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow if c in SLOW_EQUIVALENCE else ()) for c in EQUIVALENCE_CASES])
def test_two_processes_of_batch_2_equal_one_process_of_batch_4(case: str, tmp_path: Path, cache_dir: Path) -> None:
    from polytask.cli import main

    net, module, weighting = EQUIVALENCE_CASES[case]
    single, ddp = tmp_path / "run1", tmp_path / "run2"
    _write_config(tmp_path / "config1.yaml", single, cache_dir, TOTAL_BATCH, net, module, weighting)
    _write_config(tmp_path / "config2.yaml", ddp, cache_dir, TOTAL_BATCH // 2, net, module, weighting)
    main(["fit", "--config", str(tmp_path / "config1.yaml")])
    launcher = "lightning" if case in LIGHTNING_LAUNCHED else "external"
    run_ddp([["fit", "--config", str(tmp_path / "config2.yaml"), "--config", str(DDP_CPU)]], tmp_path, launcher=launcher)
    single_results, single_state = _results(single)
    ddp_results, ddp_state = _results(ddp)

    assert set(single_results) == set(TASKS) == set(ddp_results)
    for task, metrics in single_results.items():
        for name, value in metrics.items():
            assert ddp_results[task][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (task, name)

    assert single_state.keys() == ddp_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0.0, atol=1e-5, msg=key)
    initial, trainable = _initial_state(tmp_path / "config1.yaml")  # the comparison must not be vacuous:
    moved = [name for name in trainable if not torch.equal(single_state[name], initial[name])]
    assert len(moved) >= 0.9 * len(trainable), f"only {len(moved)} of {len(trainable)} parameters trained"
    for task in TASKS:  # (biases before a BatchNorm have no gradient)
        assert any(name.startswith(f"net.heads.{task}.") for name in moved), f"the head of {task} did not train"
    if weighting is not None:
        if weighting["class_path"].endswith("FAMO"):  # the strategy's state moved, identically in both runs
            logits = single_state["weighting.logits"]
            assert float(logits.abs().sum()) > 0 and int(single_state["weighting.adam_steps"]) > 0
        if weighting["class_path"].endswith("DynamicWeightAverage"):  # the epoch's loss sums, the same in both runs
            assert float(single_state["weighting.loss_sum"].abs().sum()) > 0 and int(single_state["weighting.steps"]) == 2
        if weighting["class_path"].endswith("GradNorm"):  # its weights were trained, identically in both runs
            assert not torch.equal(single_state["weighting.task_weights"], initial["weighting.task_weights"])
        # the interference callback (on in this case) averages the per-task gradients over the processes first
        summaries = [json.loads((d / "interference" / "summary.json").read_text()) for d in (single, ddp)]
        assert summaries[0]["measurements"] == summaries[1]["measurements"] == 2
        for key in ("cos", "norm_ratio", "norm"):
            torch.testing.assert_close(torch.tensor(summaries[1][key]), torch.tensor(summaries[0][key]), rtol=1e-5, atol=1e-6, msg=key)


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
