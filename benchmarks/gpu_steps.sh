# Shared helpers of benchmarks/gpu_check.sh and benchmarks/gpu_results.sh; sourced, never run.
#
# A borrowed GPU window is short (one command of at most 10 minutes, 15 minutes of device time with
# the machine's start) and hands back at most 8 files, so both scripts run a fixed list of steps,
# each under its own time limit, most valuable first, and after every step rewrite two files in
# OUT_DIR: summary.md (environment, plan, then per step its status, time, command and markdown
# tables, or the end of its log when it failed) and results.tar.gz (every log, CSV, table, plot and
# the JUnit XML; checkpoints and shards excluded). A few plots are also copied next to them.
# A timeout late in the run therefore still leaves every earlier result.
#
# --dry-run (or DRY_RUN=1) runs the same steps on CPU with tiny shapes: CUDA is hidden
# (CUDA_VISIBLE_DEVICES=) and Triton kernels run under the interpreter (TRITON_INTERPRET=1).
#
# Functions: gpu_args USAGE "$@" (DRY_RUN, OUT_DIR), gpu_begin TITLE (WORK, PACK, PY, summary
# header), gpu_plan NAME LIMIT... (the plan table), step NAME LIMIT CMD... (run, record, publish),
# gpu_install (offline install of the carried wheels and of the project), gpu_end (exit status).
# A shell function runs under a step as `step NAME LIMIT bash -c FUNC` after `export -f FUNC`;
# gpu_begin exports DRY_RUN, WORK, PACK and PY for that.

export GPU_WHEELS_DIR="${GPU_WHEELS_DIR:-gpu-wheels}"
PUBLISH=()  # "path/in/PACK:name.png" pairs copied to OUT_DIR after every step (at most 6)

gpu_args() {  # gpu_args USAGE "$@": --dry-run / DRY_RUN=1, and the output folder ($1, else $OUT)
  local usage="$1" positional=()
  shift
  DRY_RUN="${DRY_RUN:-0}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) echo "$usage"; exit 0 ;;
      -*) echo "unknown option $1; $usage" >&2; exit 2 ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  OUT_DIR="${positional[0]:-${OUT:-}}"
  if [ ${#positional[@]} -gt 1 ] || [ -z "$OUT_DIR" ]; then
    echo "$usage" >&2
    exit 2
  fi
}

gpu_begin() {  # gpu_begin TITLE: folders, Python, environment variables, summary header
  mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/igpt-gpu.XXXXXX")"
  PACK="$WORK/results"  # packed into results.tar.gz; heavy files (shards, checkpoints) live beside it
  mkdir -p "$PACK/logs"
  PY="${PYTHON:-python3}"
  export DRY_RUN WORK PACK PY
  FAILED=()
  T_START=$SECONDS
  export PYTHONUNBUFFERED=1
  if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  fi
  {
    echo "# $1"
    echo
    echo "mode: $([ "$DRY_RUN" = 1 ] && echo 'dry run (CPU, tiny shapes, CUDA hidden, TRITON_INTERPRET=1)' || echo GPU)," \
      "started $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
      "$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '(+ uncommitted changes)')"
    echo
    echo '```'
    if [ "$DRY_RUN" != 1 ] && command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    fi
    "$PY" - <<'EOF' 2>&1
import os, platform
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "none"
print(f"python {platform.python_version()} | torch {torch.__version__} (cuda {torch.version.cuda}) | "
      f"triton {triton_version} | cpus {os.cpu_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.1f} GiB")
EOF
    echo '```'
  } > "$PACK/summary.md"
}

gpu_plan() {  # gpu_plan NAME LIMIT WHAT [NAME LIMIT WHAT ...]: the plan table of the summary
  local total=0
  { echo; echo "| step | limit (s) | what |"; echo "|---|---|---|"; } >> "$PACK/summary.md"
  while [ $# -ge 3 ]; do
    echo "| $1 | $2 | $3 |" >> "$PACK/summary.md"
    total=$((total + $2))
    shift 3
  done
  echo "| total | $total | $([ "$DRY_RUN" = 1 ] && echo 'a dry run allows 4x each limit') |" >> "$PACK/summary.md"
  echo "plan: ${total}s of step limits; results in $OUT_DIR"
  publish
}

publish() {  # summary.md, results.tar.gz and the PUBLISH plots into OUT_DIR, each replaced atomically
  cp "$PACK/summary.md" "$OUT_DIR/summary.md.tmp" && mv -f "$OUT_DIR/summary.md.tmp" "$OUT_DIR/summary.md"
  tar czf "$OUT_DIR/results.tar.gz.tmp" -C "$WORK" --exclude='*.pt' --exclude='*.tar' results \
    && mv -f "$OUT_DIR/results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
  local pair
  for pair in "${PUBLISH[@]:0:6}"; do
    if [ -f "$PACK/${pair%%:*}" ]; then
      cp "$PACK/${pair%%:*}" "$OUT_DIR/${pair##*:}.tmp" && mv -f "$OUT_DIR/${pair##*:}.tmp" "$OUT_DIR/${pair##*:}"
    fi
  done
}

step() {  # step NAME LIMIT CMD...: run CMD under a time limit, log to PACK/logs/NAME.log, record, publish
  local name="$1" limit="$2"
  shift 2
  local log="$PACK/logs/$name.log" start=$SECONDS rc status md
  [ "$DRY_RUN" = 1 ] && limit=$((limit * 4))  # a loaded CPU, not the step, should never fail a dry run
  mkdir -p "$PACK/$name"
  echo "== $name (limit ${limit}s)"
  { printf '$'; printf ' %q' "$@"; echo; } > "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (limit reached)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ $rc -eq 0 ] || FAILED+=("$name")
  {
    echo
    echo "## $name: $status, $((SECONDS - start)) s of $limit s"
    echo
    sed -n '1s/^\$ \(.*\)/`\1`/p' "$log"
    local tables=0
    for md in "$PACK/$name"/*.md; do
      [ -f "$md" ] || continue
      echo
      sed 's/^# /### /' "$md"
      tables=$((tables + 1))
    done
    if [ $rc -ne 0 ] || [ $tables -eq 0 ]; then
      echo
      echo '```'
      tail -n +2 "$log" | tr '\r' '\n' | grep -v '^ *$' | tail -n "$([ $rc -eq 0 ] && echo 6 || echo 25)" | cut -c1-300
      echo '```'
    fi
  } >> "$PACK/summary.md"
  echo "   $status in $((SECONDS - start))s"
  publish
}

gpu_install() {  # offline: the carried wheels (required ones, fallbacks only where missing), then the project
  local required=(webdataset braceexpand faiss-cpu)  # the device image lacks these
  local fallback=(click:click tqdm:tqdm packaging:packaging yaml:pyyaml)  # module:wheel, for an image without them
  local missing=() pair
  for pair in "${fallback[@]}"; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
  done
  echo "fallback wheels needed: ${missing[*]:-none}"
  if [ "$DRY_RUN" = 1 ]; then  # check that the wheels are there and resolve; install nothing
    if [ -d "$GPU_WHEELS_DIR" ]; then
      "$PY" -m pip install --dry-run --no-deps --no-index --find-links "$GPU_WHEELS_DIR" \
        --target "$WORK/site" "${required[@]}" || return 1
    else
      echo "no $GPU_WHEELS_DIR/ here (make gpu-wheels); checking imports only"
    fi
    "$PY" -c "import igpt_fast.kernels, igpt_fast.data, webdataset, braceexpand; print('imports ok')"
    return
  fi
  local rc=0  # without the wheels the project still goes in: the kernel steps need torch and triton only
  if [ ! -d "$GPU_WHEELS_DIR" ]; then
    echo "no $GPU_WHEELS_DIR/: run \`make gpu-wheels\` before the GPU window and carry the folder" >&2
    rc=1
  else
    "$PY" -m pip install -q --no-deps --no-index --no-cache-dir --find-links "$GPU_WHEELS_DIR" \
      "${required[@]}" "${missing[@]}" || rc=1
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . || return 1
  "$PY" -c "import igpt_fast.kernels, igpt_fast.data, faiss; print('imports ok')" || return 1
  return $rc
}
export -f gpu_install

gpu_end() {  # the closing line of the summary; exit status 1 when any step failed
  {
    echo
    echo "## end: $((SECONDS - T_START)) s, $([ ${#FAILED[@]} -eq 0 ] && echo 'every step ok' || echo "failed: ${FAILED[*]}")"
  } >> "$PACK/summary.md"
  publish
  echo "summary: $OUT_DIR/summary.md ($((SECONDS - T_START))s); work folder $WORK"
  [ ${#FAILED[@]} -eq 0 ]
}
