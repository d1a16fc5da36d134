"""Benchmarking (``polytask bench``): speed, memory, parameters and FLOPs of a config's network,
and ratios measured in one run.

For the network a config builds (any ``polytask fit`` config; several ``--config`` files are merged
in order, as for ``fit``), at the config's resolution, ``--image-size``, or a resolution reduced to
``--max-pixels``:

* **training step** (``zero_grad`` + :class:`MultiTaskModule`'s ``training_step`` + backward +
  optimizer step, the config's optimizer) and **inference** (``eval`` mode, ``inference_mode``);
* in every precision of ``--modes`` (``fp32``; ``bf16``: ``torch.autocast`` with bfloat16, as
  Lightning's ``bf16-mixed``), eager and, with ``--compile``, ``torch.compile``;
* the same for the **bare network**: the net's ``backbone`` (or ``trunk``) with one Conv1x1 per dense
  task on its last feature map and bilinear upsampling (GAP + Linear for image-level tasks);
* the **per-task mode** of nets that have one (``forward_task(images, name)``, e.g. ETR-NLP's
  :class:`~polytask.models.etr_nlp.net.RoutedNet`): every task's forward in turn, and per-task
  training (one forward, backward and optimizer step per task, as ``PerTaskModule``);
* **peak memory** of one call above what is held before it, gradients freed before it (so the
  gradients count; parameters and optimizer state do not): on CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU the torch profiler's accounting of the CPU
  allocator (the running ``Total Allocated`` of its memory events), because ``tracemalloc`` does
  not see torch's allocations and ``ru_maxrss`` is a process-wide high-water mark that cannot go
  down between variants;
* parameters and forward FLOPs (:func:`polytask.models.summary.summarize_model`), and the parameters that get
  no gradient in a training step (DDP's ``find_unused_parameters``);
* with ``--profile N``, the N operators with the most self time in one call of every variant;
* samples/s of the config's training loader (:mod:`polytask.profiling.loader`), next to the training
  step's samples/s;
* with ``--versus B`` (several are merged in order, as ``--config``), another config timed against
  this one in the same interleaved run, at the same resolution and batch size (``--image-size`` /
  ``--batch-size`` or the first config's) and with the same overrides: every variant both sides
  run (same precisions, eager/compiled, train/infer) gets ``time(B) / time(A)`` of their medians.

Inputs: the loader's first batch (brought to the benchmark's resolution and batch size). When the
dataset's files are absent the loader is skipped with the reason and random images and targets
of the sample contract are used; a :class:`FilelessDataModule` supplies the tasks when the real
datamodule cannot even be built. Pretrained weights are never loaded (same speed, no download).

Timing method: every variant is warmed up (``--warmup`` calls; torch.compile compiles there),
then the variants are interleaved, ``--steps`` rounds of one call each (the starting variant
rotates every round), and each variant reports the median of its calls. Ratios are those of
medians measured in the same run, so machine noise shifts all variants alike.

The command line is :mod:`polytask.cli.bench` (usage there).

Modules: :mod:`.experiment` (the config built for benchmarking), :mod:`.inputs` (the batch),
:mod:`.bare` (the bare network), :mod:`.variants` (the timed calls), :mod:`.timing`,
:mod:`.memory`, :mod:`.loader`, :mod:`.run` (per device, ``--versus``) and :mod:`.report`.
"""
