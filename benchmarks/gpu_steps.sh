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
# Every step runs the python of a throwaway venv, $WORK/venv, made over $PYTHON (python3) so that it
# sees $PYTHON's packages (torch, triton, pip, setuptools); the install step puts the carried wheels
# and the project into it, offline, with the same commands in a dry run as on the GPU. The base stays
# untouched (a system Python may refuse pip installs outright, PEP 668).
#
# Functions: gpu_args USAGE "$@" (DRY_RUN, OUT_DIR), gpu_begin TITLE (WORK, PACK, the venv and PY,
# summary header), gpu_plan NAME LIMIT... (the plan table), step NAME LIMIT CMD... (run, record,
# publish), gpu_venv DIR (a venv over "$PY"; PY becomes its python), gpu_install_project (pip install
# -e . offline), gpu_install (the install step: carried wheels, the project, checks), gpu_end (exit
# status). tests/test_packaging.py sources this file and installs the project with the last two.
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

gpu_begin() {  # gpu_begin TITLE: folders, the venv (PY), environment variables, summary header
  mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/igpt-gpu.XXXXXX")"
  PACK="$WORK/results"  # packed into results.tar.gz; heavy files (shards, checkpoints) live beside it
  mkdir -p "$PACK/logs"
  FAILED=()
  T_START=$SECONDS
  local base="${PYTHON:-python3}" venv_line
  base="$(command -v "$base" || echo "$base")"
  PY="$base"
  if gpu_venv "$WORK/venv" > "$PACK/logs/venv.log" 2>&1; then
    venv_line="python: $PY, a venv over $base that sees its packages (the versions below are the venv's)"
  else  # the install step then fails; the other steps still run, on the base python
    venv_line="python: $PY; no venv over it (logs/venv.log), so the install step fails"
  fi
  export DRY_RUN WORK PACK PY
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
    echo "$venv_line"
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
  { printf '$'; printf ' %q' "$@"; echo; echo "# python: $PY"; } > "$log"
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
      tail -n +3 "$log" | tr '\r' '\n' | grep -v '^ *$' | tail -n "$([ $rc -eq 0 ] && echo 6 || echo 25)" | cut -c1-300
      echo '```'
    fi
  } >> "$PACK/summary.md"
  echo "   $status in $((SECONDS - start))s"
  publish
}

gpu_venv() {  # gpu_venv DIR: a venv at DIR that sees the packages of "$PY"; PY becomes its python
  # What `python -m venv --system-site-packages` does, but through a .pth file of lines
  # `import site; site.addsitedir(DIR)`, one per site-packages folder of "$PY": the base's own .pth
  # files are read too (editable installs, distutils shims), and it also works when "$PY" is itself a
  # venv (a developer's .venv), whose packages --system-site-packages would skip. The file is named to
  # sort after the venv's own .pth files (site reads them in name order), so what is installed in the
  # venv, an editable igpt-fast included, comes before the base's. No pip in the venv: the base's runs.
  local dir="$1" sites
  sites="$("$PY" - <<'EOF'
import os, site
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print("\n".join(d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
EOF
)" || return 1
  "$PY" -m venv --without-pip "$dir" || return 1
  "$dir/bin/python" - "$sites" <<'EOF' || return 1
import os, sys, sysconfig
path = os.path.join(sysconfig.get_path("purelib"), "zz-base-site-packages.pth")
with open(path, "w") as f:
    f.writelines(f"import site; site.addsitedir({d!r})\n" for d in sys.argv[1].splitlines())
print(f"{sys.prefix} over {sys.argv[1].splitlines()}, through {path}")
EOF
  PY="$dir/bin/python"
}

gpu_install_project() {  # the project in the current folder, editable, into the environment of "$PY"
  # --no-build-isolation: the build uses the environment's own setuptools, as pyproject.toml allows;
  # --no-index (PIP_NO_INDEX too, for any pip the build starts): nothing is fetched, even with a network.
  PIP_NO_INDEX=1 "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e .
}
export -f gpu_install_project

gpu_install() {  # offline, into the venv: carried wheels (required, fallbacks where missing), the project
  local required=(webdataset braceexpand faiss-cpu)  # the device image lacks these
  local fallback=(click:click tqdm:tqdm packaging:packaging yaml:pyyaml)  # module:wheel, for an image without them
  local missing=() pair rc=0
  if [ "$PY" != "$WORK/venv/bin/python" ]; then
    echo "no venv at $WORK/venv (logs/venv.log): nothing installed, the steps run $PY as it is" >&2
    return 1
  fi
  "$PY" -m pip --version
  for pair in "${fallback[@]}"; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
  done
  echo "fallback wheels needed: ${missing[*]:-none}"
  if [ ! -d "$GPU_WHEELS_DIR" ]; then  # the project still goes in: the kernel steps need torch and triton only
    echo "no $GPU_WHEELS_DIR/: run \`make gpu-wheels\` before the GPU window and carry the folder" >&2
    [ "$DRY_RUN" = 1 ] || rc=1
  elif [ "$DRY_RUN" = 1 ]; then  # py3.12 wheels: check that they are there and resolve; install none
    PIP_NO_INDEX=1 "$PY" -m pip install --dry-run --no-deps --no-index --find-links "$GPU_WHEELS_DIR" \
      --target "$WORK/site" "${required[@]}" || return 1
  else
    PIP_NO_INDEX=1 "$PY" -m pip install -q --no-deps --no-index --no-cache-dir --find-links "$GPU_WHEELS_DIR" \
      "${required[@]}" "${missing[@]}" || rc=1
  fi
  gpu_install_project || return 1
  # From $WORK, not the checkout, so that igpt_fast comes from the venv's install, not the current folder.
  (cd "$WORK" && "$PY" - <<'EOF') || return 1
import importlib.metadata, sys
import braceexpand, faiss, webdataset
import igpt_fast, igpt_fast.data, igpt_fast.kernels
where = importlib.metadata.distribution("igpt-fast").locate_file("")
print(f"python {sys.executable}, venv {sys.prefix}")
print(f"igpt_fast {igpt_fast.__file__}, installed in {where}")
if sys.prefix == sys.base_prefix or not str(where).startswith(sys.prefix + "/"):
    sys.exit(f"igpt-fast is not installed in the venv {sys.prefix}")
print("imports ok")
EOF
  "${PY%/python}/igpt-fast" --help > /dev/null && echo "igpt-fast --help ok" || return 1
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
