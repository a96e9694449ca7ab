#!/usr/bin/env bash
# GPU check: the CUDA tests, short bf16 SIP-It and DLMI runs (tiny and ~1B random-weight models, both built
# from a config, nothing downloaded) and, with 2+ GPUs, a two-rank DDP run; one PASS/FAIL/SKIP line per part,
# within about 5 minutes on one GPU. Exits 1 if any part failed.
#
#   bash benchmarks/gpu_check.sh          # on a GPU machine (uses the `python` on PATH, not .venv)
#   bash benchmarks/gpu_check.sh --cpu    # the same parts on the CPU, tiny model only (tests/test_gpu_check.py)
#
# $OUT set: the lines, the hardware and the versions also go to $OUT/gpu_check.txt, failed parts' logs to
# $OUT/gpu_check_logs/.
#
# Offline GPU machines: Python packages the machine lacks (it usually has torch, transformers and lightning
# but not jsonargparse or gguf) are installed from wheels carried in .whl/ at the repository root (git
# ignores it). Fill it on a networked machine, from the repository root; all of these are pure-Python
# wheels, so any platform's download works (-c pins the versions lit-inversion was tested with):
#
#   pip download --only-binary :all: --no-deps -c constraints.txt -d .whl \
#       jsonargparse docstring-parser typeshed-client gguf requests urllib3 idna certifi charset-normalizer \
#       pytest pluggy iniconfig pygments hypothesis sortedcontainers attrs
#
# jsonargparse[signatures] (what LightningCLI needs) = jsonargparse + docstring-parser + typeshed-client;
# gguf wants requests; pytest and hypothesis are for the CUDA tests (tests/conftest.py imports hypothesis).
# If the machine also lacks accelerate, torchmetrics or filelock, add those names (and tqdm, PyYAML,
# typing-extensions if missing). The project itself is installed with `pip install --no-deps -e .`.
set -euo pipefail

MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HELPER="$ROOT/benchmarks/gpu_check_helper.py"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# This checkout's package wins over any other installed copy, and the run works even if the editable
# install below cannot be made (no setuptools offline); converted models, tables and token maps of the
# random models go to a throwaway cache, not the user's.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LIT_INVERSION_CACHE="$WORK/cache"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# The whole check must end within 5 minutes on one GPU: every part gets at most its own cap and what
# is left of this budget (`timeout` kills the part's whole process group, DDP ranks included).
BUDGET=$([[ $MODE == gpu ]] && echo 290 || echo 150)
DEADLINE=$((SECONDS + BUDGET))
if [[ $MODE == gpu ]]; then ACCEL=cuda; else ACCEL=cpu; fi

RESULTS=()  # every part's line, for $OUT/gpu_check.txt
FAILED=0

say() {  # one result line on stdout (and kept for the report)
  echo "$1"
  RESULTS+=("$1")
}

skip() { say "SKIP $1 ($2)"; }

# part NAME CAP FUNCTION [ARGS]: run FUNCTION in a subshell with errexit, log to $WORK/NAME.log, time it,
# print one line. FUNCTION may write a detail for the PASS line to $DETAIL; the log's last line is the
# FAIL reason. Not called in an `if`: errexit would be off inside the function.
part() {
  local name=$1 cap=$2 left rc start detail
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    say "FAIL $name (not started: the ${BUDGET} s budget is spent)"
    FAILED=1
    return
  fi
  PART_END=$((SECONDS + (cap < left ? cap : left)))
  DETAIL="$WORK/$name.detail"
  : >"$DETAIL"
  start=$SECONDS
  set +e  # errexit back on inside the subshell: a failing command ends the part, not the script
  (set -e; "$@") >"$WORK/$name.log" 2>&1
  rc=$?
  set -e
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    detail=$(tr '\n' ' ' <"$DETAIL" | sed 's/ *$//')
    say "PASS $name (${took} s${detail:+; $detail})"
  else
    local why
    if ((rc == 124 || rc == 137)); then why="timed out"; else why=$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200); fi
    say "FAIL $name (${took} s; rc $rc: $why)"
    FAILED=1
    # The log's tail on stderr, so stdout keeps one line per part; the whole log goes to $OUT.
    tail -n 30 "$WORK/$name.log" | sed 's/^/  | /' >&2
    if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT/gpu_check_logs" && cp "$WORK/$name.log" "$OUT/gpu_check_logs/"; fi
  fi
}

# A command bounded by what is left of the current part's time.
bounded() {
  local left=$((PART_END - SECONDS))
  ((left > 0)) || { echo "no time left for: $*"; return 124; }
  timeout --kill-after=10 "$left" "$@"
}

# ----- setup: missing packages from .whl/, the project itself ---------------------------------------
setup() {
  local missing
  # module:package pairs lit-inversion imports, and (GPU mode only) the CUDA tests.
  missing=$(MODE=$MODE python - <<'EOF'
import importlib.util, os
need = {"jsonargparse": "jsonargparse[signatures]", "docstring_parser": "docstring-parser",
        "typeshed_client": "typeshed-client", "gguf": "gguf", "accelerate": "accelerate",
        "torchmetrics": "torchmetrics", "filelock": "filelock"}
if os.environ["MODE"] == "gpu":
    need.update(pytest="pytest", hypothesis="hypothesis")
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
  if [[ -n "$missing" ]]; then
    if [[ ! -d .whl ]]; then
      echo "missing $missing and no .whl/ to install them from (see the top of benchmarks/gpu_check.sh)"
      return 1
    fi
    # shellcheck disable=SC2086  # one word per package
    python -m pip install --no-index --find-links .whl $missing
    echo "installed from .whl: $missing" >>"$DETAIL"
  fi
  # Looked up outside the repository and without PYTHONPATH (there the checkout itself is importable),
  # without importing it (seconds of torch and lightning imports; the env part does that).
  if ! (cd / && env -u PYTHONPATH python -c 'import importlib.util as u; assert u.find_spec("lit_inversion")'); then
    # No build isolation: an offline machine could not fetch setuptools into an isolated build env.
    if python -m pip install --no-deps --no-build-isolation -e . \
        || python -m pip install --no-deps --no-index --find-links .whl -e .; then
      echo "installed lit-inversion (editable)" >>"$DETAIL"
    else
      echo "lit-inversion not installed: running it from PYTHONPATH" >>"$DETAIL"
    fi
  fi
}

# ----- env: the hardware and versions (also what $OUT/gpu_check.txt records) --------------------------
env_probe() {
  MODE=$MODE python - >"$WORK/env.txt" <<'EOF'
import os, platform
import lightning, torch, transformers
import lit_inversion.cli  # the setup worked: the CLI and its imports (jsonargparse, ...) load
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    hw = f"{n} x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
else:
    n, hw = 0, f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
print(n)
print(f"{hw}; python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}")
if os.environ["MODE"] == "gpu" and n == 0:
    raise SystemExit("torch sees no CUDA GPU (run with --cpu for the CPU check)")
EOF
  sed -n 2p "$WORK/env.txt" >>"$DETAIL"
}

# ----- the parts ---------------------------------------------------------------------------------------
cuda_tests() {
  bounded python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
  # pytest's summary ("22 passed, 1 skipped in 80s") for the PASS line
  grep -E '^[0-9]+ (passed|skipped)' "$WORK/cuda-tests.log" | tail -n 1 | sed 's/ in [0-9.]*s.*//' >>"$DETAIL"
}

build_model() {  # build_model SIZE: $WORK/model-SIZE
  bounded python "$HELPER" model "$WORK/model-$1" --size "$1" --device "$ACCEL" | tail -n 1 >>"$DETAIL"
}

# A job config as tests/test_cli.py writes them: everything under $WORK/RUN, Lightning's default logger
# (TensorBoard if installed, else CSV), the project's checkpoint callback.
job_config() {  # job_config RUN MODEL_AND_DATA_YAML
  local run="$WORK/$1"
  mkdir -p "$run"
  cat >"$run/job.yaml" <<EOF
seed_everything: 0
results_path: $run/results.jsonl
trainer:
  accelerator: $ACCEL
  devices: 1
  max_epochs: 1
  default_root_dir: $run
  callbacks:
    - class_path: lit_inversion.checkpointing.LastCheckpoint
      init_args: {dirpath: $run/ckpt}
$2
EOF
}

# SIP-It in bf16: bf16-mixed makes the gradient chains bf16, screen_dtype auto screens candidates in bf16 on
# a GPU; the model stays float32 (exact verification needs it, SIP-It refuses --model.dtype bfloat16), so
# every target must still be recovered exactly.
sipit() {  # sipit SIZE LAYER COUNT LENGTH [extra CLI args]
  local size=$1 layer=$2 count=$3 length=$4 run="sipit-$1"
  shift 4
  job_config "$run" "model:
  class_path: lit_inversion.sipit.SipItModule
  init_args:
    model_name_or_path: $WORK/model-$size
    method:
      class_path: lit_inversion.sipit.SipItConfig
      init_args: {screen_dtype: auto}
data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {layer: $layer}"
  bounded python "$HELPER" fit --peak "$WORK/$run/peak" -- fit --config "$WORK/$run/job.yaml" \
    --trainer.precision bf16-mixed --data.num_random "$count" --data.random_length "$length" "$@"
  python "$HELPER" check "$WORK/$run/results.jsonl" --count "$count" --exact --unit token \
    --peak "$WORK/$run/peak" >>"$DETAIL"
}

# DLMI in bf16: the model loaded in bf16 and bf16-mixed (the search's compute dtype follows it).
dlmi() {  # dlmi SIZE VOCAB COUNT TARGET_LENGTH PROMPT_LENGTH STEPS
  local size=$1 run="dlmi-$1"
  job_config "$run" "model:
  class_path: lit_inversion.dlmi.DlmiModule
  init_args:
    model_name_or_path: $WORK/model-$size
    method:
      class_path: lit_inversion.dlmi.DlmiConfig
      init_args: {check_every: 2}
data:
  class_path: lit_inversion.dlmi.OutputTargetsDataModule
  init_args: {targets_file: $WORK/$run/targets.jsonl, batch_size: $3}"
  python "$HELPER" targets "$WORK/$run/targets.jsonl" --vocab "$2" --count "$3" --length "$4" >/dev/null
  bounded python "$HELPER" fit --peak "$WORK/$run/peak" -- fit --config "$WORK/$run/job.yaml" \
    --trainer.precision bf16-mixed --model.dtype bfloat16 --model.prompt_length "$5" --model.num_steps "$6"
  python "$HELPER" check "$WORK/$run/results.jsonl" --count "$3" --unit step --peak "$WORK/$run/peak" >>"$DETAIL"
}

# Two ranks (NCCL), through the real launcher (`python -m lit_inversion`): 5 targets, an odd split, merged
# into one results file with each target once.
ddp() {
  job_config ddp "model:
  class_path: lit_inversion.sipit.SipItModule
  init_args: {model_name_or_path: $WORK/model-tiny}
data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {layer: 1, num_random: 5, random_length: 4}"
  bounded python -m lit_inversion fit --config "$WORK/ddp/job.yaml" --trainer.devices 2 --trainer.strategy ddp \
    --trainer.precision bf16-mixed
  python "$HELPER" check "$WORK/ddp/results.jsonl" --count 5 --exact --unit token >>"$DETAIL"
}

# ----- run them ----------------------------------------------------------------------------------------
part setup 120 setup
part env 60 env_probe
if [[ ! -s "$WORK/env.txt" ]] || ! grep -q '^PASS env' <(printf '%s\n' "${RESULTS[@]}"); then
  FAILED=1  # nothing below can run without the packages or (GPU mode) a GPU
else
  GPUS=$(head -n 1 "$WORK/env.txt")
  if [[ $MODE == gpu ]]; then part cuda-tests 150 cuda_tests; else skip cuda-tests "--cpu: they need CUDA"; fi
  part model-tiny 60 build_model tiny
  part sipit-bf16-tiny 60 sipit tiny 1 2 4
  part dlmi-bf16-tiny 60 dlmi tiny 96 2 4 3 4
  if [[ $MODE == cpu ]]; then
    skip model-1b "--cpu: tiny sizes only"
    skip sipit-bf16-1b "--cpu: tiny sizes only"
    skip dlmi-bf16-1b "--cpu: tiny sizes only"
  else
    part model-1b 60 build_model 1b
    # Longer prompts and targets than the tiny runs, so the per-token and per-step times mean something.
    part sipit-bf16-1b 75 sipit 1b 4 2 8
    part dlmi-bf16-1b 75 dlmi 1b 32000 2 20 20 16
  fi
  if [[ $MODE == cpu ]]; then skip ddp "--cpu"
  elif ((GPUS < 2)); then skip ddp "$GPUS GPU"
  else part ddp 90 ddp
  fi
fi

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  {
    echo "# bash benchmarks/gpu_check.sh${1:+ $1}  ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short=7 HEAD 2>/dev/null || echo 'no git'))"
    echo "hardware: $(sed -n 2p "$WORK/env.txt" 2>/dev/null)"
    echo "torch: $(python -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"
    printf '%s\n' "${RESULTS[@]}"
    echo "total: ${SECONDS} s, $([[ $FAILED == 0 ]] && echo passed || echo FAILED)"
  } >"$OUT/gpu_check.txt"
fi
exit "$FAILED"
