#!/usr/bin/env bash
# GPU check: everything polytask has not yet measured on a GPU, in one run of under 10 minutes on one
# large GPU (issue 15). Usage, from anywhere:
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same steps on the CPU at tiny sizes (a minute or two)
#
# Installs nothing. Python: $PYTHON if set, else the repository's .venv/bin/python (the README's
# `python3 -m venv .venv && .venv/bin/pip install -e '.[test]'`; the test step needs the test extras),
# else the python3 of the current environment.
#
# Steps (each under its own `timeout`; a step that fails or times out is recorded and the next one runs;
# the whole run stops itself before GPU_CHECK_LIMIT_S seconds, default 570):
#   env            torch and CUDA versions, device name (env.json)
#   tests          the CUDA tests of tests/test_gpu_check.py (bf16 autocast, channels-last, inductor compile,
#                  the package default and the paper configs' deterministic settings with bilinear backward,
#                  polytask fit on the GPU in bf16-mixed and as DDP with NCCL on one device) and two fit tests
#                  that take the GPU through accelerator: auto (the main job; kill and exact resume), junit XML
#                  in tests.xml. Dry run: the same selection with -k cuda (the CUDA tests skip, the others are
#                  deselected).
#   bench_taskexpert_vitl   polytask bench of configs/taskexpert_pascal_vitl.yaml at 512x512, fp32 and bf16, the
#                  config's batch (2), model and bare backbone: step time, images/s, peak memory
#   bench_etr_nlp_vs_hard_sharing   polytask bench --versus: hard sharing (configs/etr_nlp_nyuv2.yaml +
#                  configs/etr_nlp_baseline_hard_sharing_segnet.yaml, layered as its header says) against
#                  ETR-NLP (configs/etr_nlp_nyuv2.yaml) at 288x384, fp32 and bf16, one interleaved run
#   task_batching  ETR-NLP's all-task forward with the task paths stacked vs looped (benchmarks/etr_nlp_task_batching.py,
#                  NYUv2 SegNet widths, T = 3, batch 2 and 8 at 288x384): checks `task_batching: auto`'s assumption
#                  that stacking is the faster mode on a GPU (task_batching.md, task_batching.json)
#   summary        OUT_DIR/summary.json and OUT_DIR/summary.md (benchmarks/gpu_check_summary.py)
# Dry run: --device cpu --image-size 64 64 --batch-size 1 --steps 1 --warmup 0 --threads 1, and SGD for ViT-L
# (Adam's state would be 2.7 GB of host memory). Pretrained weights are never loaded by polytask bench.
# Logs of every step are in OUT_DIR/logs/. Exit status: 0 when every step succeeded, else 1.
set -u

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
DRY_RUN=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $arg" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
    esac
done
[ -n "$OUT" ] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="$(command -v python3)"; fi
LIMIT_S="${GPU_CHECK_LIMIT_S:-570}"
SUMMARY_RESERVE_S=20
STEPS="$OUT/steps.tsv"
: > "$STEPS"
cd "$REPO" || exit 2
export POLYTASK_CACHE="${POLYTASK_CACHE:-$OUT/cache}"
export PYTHONUNBUFFERED=1

# run_step NAME LIMIT_S OUTPUT CMD...: run CMD under timeout (at most what is left of the run), log to
# logs/NAME.log, append "name rc wall_s limit_s status output command" to steps.tsv (tab-separated).
run_step() {
    local name="$1" limit="$2" output="$3"; shift 3
    local left=$((LIMIT_S - SUMMARY_RESERVE_S - SECONDS))
    local log="$OUT/logs/$name.log" rc status start wall cmd="$*"
    [ "$limit" -le "$left" ] || limit="$left"
    if [ "$limit" -lt 10 ]; then
        printf '%s\t-\t0\t%s\tskipped\t%s\t%s\n' "$name" "$limit" "$output" "$cmd" >> "$STEPS"
        echo "== $name: skipped, no time left" >&2
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" >&2
    start=$SECONDS
    timeout --signal="${STEP_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" > "$log" 2>&1
    rc=$?
    wall=$((SECONDS - start))
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "$limit" "$status" "$output" "$cmd" >> "$STEPS"
    echo "== $name: $status (rc $rc, ${wall}s)" >&2
}

if [ -x "$(dirname "$PY")/polytask" ]; then POLYTASK=("$(dirname "$PY")/polytask")
else POLYTASK=("$PY" -m polytask); fi
if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    SIZE_VITL=(--image-size 64 64)
    SIZE_NYUV2=(--image-size 64 64)
    TIMING=(--batch-size 1 --steps 1 --warmup 0 --threads 1)
    TIMING_NYUV2=("${TIMING[@]}")
    VITL_OVERRIDES=(-- --model.optimizer torch.optim.SGD)
    TASK_BATCHING=(--filters 8 16 16 32 32 --tasks 3 --sizes 1x32x32 --repeats 1 --warmup 0 --threads 1)
    TEST_KEYWORDS="cuda"
else
    DEVICE=cuda
    SIZE_VITL=(--image-size 512 512)
    SIZE_NYUV2=(--image-size 288 384)
    TIMING=(--steps 5 --warmup 2)
    TIMING_NYUV2=(--steps 3 --warmup 1)
    VITL_OVERRIDES=()
    TASK_BATCHING=(--filters 64 128 256 512 512 --tasks 3 --sizes 2x288x384 8x288x384 --repeats 5 --warmup 2)
    TEST_KEYWORDS="cuda or test_the_main_job_prints_its_table or test_sigkill_mid_epoch_then_resume"
fi

run_step env 60 env.json "$PY" benchmarks/gpu_check_summary.py env "$OUT" --device "$DEVICE"

# SIGINT at the step's limit: pytest stops like at Ctrl-C and still writes the junit XML of what ran;
# --timeout: one hanging test fails alone (pytest-timeout, from the test extras)
STEP_SIGNAL=INT run_step tests 240 tests.xml "$PY" -m pytest -q -p no:cacheprovider -rs --timeout 150 \
    tests/test_gpu_check.py tests/test_main_job.py tests/test_resume.py \
    -k "$TEST_KEYWORDS" --junitxml "$OUT/tests.xml"

run_step bench_taskexpert_vitl 140 bench_taskexpert_vitl.json "${POLYTASK[@]}" bench \
    --config configs/taskexpert_pascal_vitl.yaml "${SIZE_VITL[@]}" --modes fp32,bf16 --device "$DEVICE" \
    "${TIMING[@]}" --loader-batches 0 --json "$OUT/bench_taskexpert_vitl.json" ${VITL_OVERRIDES[@]+"${VITL_OVERRIDES[@]}"}

run_step bench_etr_nlp_vs_hard_sharing 160 bench_etr_nlp_vs_hard_sharing.json "${POLYTASK[@]}" bench \
    --config configs/etr_nlp_nyuv2.yaml --config configs/etr_nlp_baseline_hard_sharing_segnet.yaml \
    --versus configs/etr_nlp_nyuv2.yaml "${SIZE_NYUV2[@]}" --modes fp32,bf16 --device "$DEVICE" \
    "${TIMING_NYUV2[@]}" --loader-batches 0 --no-bare --json "$OUT/bench_etr_nlp_vs_hard_sharing.json"

run_step task_batching 60 task_batching.md "$PY" benchmarks/etr_nlp_task_batching.py --device "$DEVICE" \
    "${TASK_BATCHING[@]}" --json "$OUT/task_batching.json" --markdown "$OUT/task_batching.md"

MODE=gpu
[ "$DRY_RUN" = 1 ] && MODE=dry-run
echo "== summary" >&2
if ! timeout 60 "$PY" benchmarks/gpu_check_summary.py summary "$OUT" --mode "$MODE" --wall-s "$SECONDS" \
        > "$OUT/logs/summary.log" 2>&1; then
    # the summary writer itself failed: keep at least the steps
    cat "$OUT/logs/summary.log" >&2
    {
        echo "# GPU check ($MODE): the summary writer failed, see logs/summary.log"
        echo
        echo "| step | status | rc | wall s |"
        echo "|---|---|---|---|"
        while IFS=$'\t' read -r name rc wall limit status output cmd; do
            echo "| $name | $status | $rc | $wall |"
        done < "$STEPS"
    } > "$OUT/summary.md"
    printf '{"mode": "%s", "summary_error": "see logs/summary.log", "wall_s": %s}\n' "$MODE" "$SECONDS" > "$OUT/summary.json"
    exit 1
fi
cat "$OUT/summary.md"
# exit status 1 when a step did not succeed
awk -F'\t' '$5 != "ok" { bad = 1 } END { exit bad }' "$STEPS"
