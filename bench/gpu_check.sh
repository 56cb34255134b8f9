#!/usr/bin/env bash
# One GPU check: install the package, run the GPU tests, measure the card's ceilings and every
# bench/bench_*.py (the priority ones first; the others while time lasts), and print one short table
# last (bench/report.py).
#
#   bash bench/gpu_check.sh            full sweep, under 6 minutes on an H100
#   bash bench/gpu_check.sh --quick    reduced sweep, under 2 minutes
#   bash bench/gpu_check.sh --smoke    CPU, tiny sizes, no GPU tests (what CI runs)
#   options: --only ceilings,rms_norm  run only these benches
#            --no-tests                 skip the GPU tests (all the time to the benches)
#            --tests-only               only install + the GPU tests, with the whole budget
#   Two calls on one warm machine (--tests-only, then --no-tests) fit more than one 6-minute run.
#
# Results: JSON per bench plus gpu_check.log and pytest.log in $OUT when set; else the JSON in
# bench/results/ and the logs in build/gpu_check/ (--smoke without $OUT: a temporary folder).
# At most 8 files land in $OUT (the device tool's limit): beyond that the JSON go into results.tgz.
# Environment: PYTHON (default python3); GPU_CHECK_PYTEST overrides the test selection (pytest args);
# GPU_CHECK_BUDGET overrides the total time budget in seconds (steps past it are skipped, loudly);
# APR_GIT_REV names the revision in the results where the tree has no .git (the device tool's copy).
# Exit status: 0 all passed; 1 a test or a bench failed (the benches still ran); 2 could not install
# or no CUDA device (nothing measured).
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

MODE=full
ONLY=""
SKIP_TESTS=""
TESTS_ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --smoke) MODE=smoke ;;
    --full) MODE=full ;;
    --only) ONLY="${2:?--only needs a comma-separated list of bench names}"; shift ;;
    --no-tests) SKIP_TESTS=1 ;;
    --tests-only) TESTS_ONLY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$SELF"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --quick, --smoke, --only LIST, --no-tests, --tests-only)" >&2
       exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Budgets (seconds): the whole run, and caps per step. Each step gets min(cap, what is left).
case "$MODE" in
  full)  BUDGET=348; CAP_PIP=150; CAP_TEST=150; CAP_CPU_TEST=25; CAP_BENCH=120; BENCH_FLAG="" ;;
  quick) BUDGET=115; CAP_PIP=90;  CAP_TEST=50;  CAP_CPU_TEST=0;  CAP_BENCH=45;  BENCH_FLAG="--quick" ;;
  smoke) BUDGET=170; CAP_PIP=150; CAP_TEST=60;  CAP_CPU_TEST=0;  CAP_BENCH=60;  BENCH_FLAG="--smoke"
         export CUDA_VISIBLE_DEVICES="" ;;  # smoke means CPU, even on a GPU machine
esac
# Each bench not yet started keeps MIN_BENCH seconds in reserve, so one slow step cannot starve the
# rest (a bench cut short keeps the JSON it rewrote per shape).
case "$MODE" in full) MIN_BENCH=30 ;; quick) MIN_BENCH=15 ;; smoke) MIN_BENCH=10 ;; esac
BUDGET="${GPU_CHECK_BUDGET:-$BUDGET}"
RESERVE=12  # kept back for the report

if [ -n "${OUT:-}" ]; then RES="$OUT"
elif [ "$MODE" = smoke ]; then RES="$(mktemp -d -t apr_gpu_check_smoke.XXXXXX)"
else RES="bench/results"; fi
LOGS="$RES"
[ -z "${OUT:-}" ] && [ "$MODE" != smoke ] && LOGS="build/gpu_check"  # keep logs out of bench/results
mkdir -p "$RES" "$LOGS"
LOG="$LOGS/gpu_check.log"
PYTEST_LOG="$LOGS/pytest.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

STATUS=()   # one line per step for the summary
FAILED=0
note() { STATUS+=("$(printf '%-22s %s' "$1" "$2")"); }
left() { echo $((BUDGET - SECONDS - RESERVE)); }
# step_timeout CAP [RESERVE [FLOOR]] -> seconds this step may take: min(CAP, left - RESERVE), but at
# least FLOOR while that much is left; 0: no time left, skip it.
step_timeout() {
  local left_now t floor=${3:-0}; left_now=$(left); t=$((left_now - ${2:-0}))
  [ "$1" -lt "$t" ] && t=$1
  [ "$t" -lt "$floor" ] && t=$floor
  [ "$t" -gt "$left_now" ] && t=$left_now
  [ "$t" -lt 5 ] && t=0
  echo "$t"
}
describe_rc() { case "$1" in 0) echo ok ;; 124|137) echo "TIMEOUT after ${2}s" ;; *) echo "FAILED (exit $1)" ;; esac; }

echo "== gpu_check.sh --$MODE: results in $RES, logs in $LOGS ($(date -u +%FT%TZ), budget ${BUDGET}s)"

# ---- 1. install -------------------------------------------------------------------------------
pip_install() {  # pip_install [extra pip args]: output shown and kept in $WORK/pip.log
  local t rc; t=$(step_timeout "$CAP_PIP"); [ "$t" = 0 ] && t=1  # timeout 0 would mean "no limit"
  timeout -k 5 "$t" "$PY" -m pip install -q --no-deps --no-build-isolation "$@" . > "$WORK/pip.log" 2>&1
  rc=$?
  cat "$WORK/pip.log"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "-- pip install timed out after ${t}s"
  return "$rc"
}
if [ "$MODE" = smoke ] && "$PY" -c "import apr_kernels._apr_ext" 2>/dev/null; then
  note install "skipped (apr_kernels already importable)"
else
  t0=$SECONDS
  echo "== pip install --no-deps --no-build-isolation ."
  ok=0
  pip_install && ok=1
  if [ "$ok" = 0 ] && grep -q "externally-managed-environment" "$WORK/pip.log"; then
    # A distribution Python refuses system-wide installs (PEP 668); this machine is ours to change.
    echo "-- retrying with --break-system-packages"
    pip_install --break-system-packages && ok=1
  fi
  if [ "$ok" = 0 ]; then
    echo "gpu_check.sh: FAILED: 'pip install --no-deps --no-build-isolation .' did not succeed (output above)"
    exit 2
  fi
  note install "ok ($((SECONDS - t0))s)"
fi
if ! "$PY" -c "import apr_kernels, apr_kernels._apr_ext as e; print('apr_kernels from', apr_kernels.__file__)"; then
  echo "gpu_check.sh: FAILED: apr_kernels (or its C++ extension _apr_ext) does not import after install"
  exit 2
fi

# Liger-Kernel, a baseline for the RMSNorm bench, is carried as a wheel (the GPU machine has no network).
if [ "$MODE" = smoke ]; then
  note liger "skipped (--smoke: its kernels need a GPU)"
elif compgen -G ".whl/*.whl" > /dev/null; then
  SITE=/tmp/site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    note liger "installed from .whl/ into $SITE"
  else
    note liger "FAILED to install from .whl/ (benches go on without it)"
  fi
else
  note liger "no .whl/ folder: benches go on without Liger"
fi

echo "== versions"
REV=$(git rev-parse --short HEAD 2>/dev/null || true)
if [ -n "$REV" ]; then echo "git revision $REV"
elif [ -n "${APR_GIT_REV:-}" ]; then echo "git revision $APR_GIT_REV (from APR_GIT_REV)"
else echo "git revision unknown (no .git here): run as 'APR_GIT_REV=<rev> bash bench/gpu_check.sh' to record it"; fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for mod in ("triton", "liger_kernel"):
    try:
        m = __import__(mod)
        try:
            version = md.version(mod.replace("_", "-"))
        except md.PackageNotFoundError:
            version = getattr(m, "__version__", "(version unknown)")
        print(mod, version, "from", m.__file__)
    except Exception as e:
        print(mod, "not importable:", type(e).__name__, e)
EOF
if [ "$MODE" != smoke ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: FAILED: torch.cuda.is_available() is False; use --smoke to run on CPU"
  exit 2
fi

# The benches to run: the training step first (the end-to-end number; it needs its full minute),
# then the kernels of issues 4/5, the trainer's other fused ops (PRIORITY: each keeps MIN_BENCH
# seconds in reserve), then the rest, which only get what the priority benches leave: past the
# budget they are noted as not run, not failed (--only NAME runs them; rms_norm and attention keep
# what they measured when cut).
PRIORITY="ceilings train rms_norm attention cross_entropy swiglu rope moe"
BENCHES=()
for name in $PRIORITY; do [ -f "bench/bench_$name.py" ] && BENCHES+=("$name"); done
for f in bench/bench_*.py; do
  name=$(basename "$f" .py); name=${name#bench_}
  case " ${BENCHES[*]} " in *" $name "*) ;; *) BENCHES+=("$name") ;; esac
done
if [ -n "$ONLY" ]; then
  kept=(); for name in "${BENCHES[@]}"; do [[ ",$ONLY," == *",$name,"* ]] && kept+=("$name"); done
  for name in ${ONLY//,/ }; do
    [ -f "bench/bench_$name.py" ] || { note "bench $name" "FAILED: no bench/bench_$name.py (--only)"; FAILED=1; }
  done
  BENCHES=("${kept[@]}")
fi
if [ -n "$TESTS_ONLY" ]; then BENCHES=(); CAP_TEST=$BUDGET; fi
is_priority() { [[ " $PRIORITY " == *" $1 "* ]] || [ -n "$ONLY" ]; }  # --only: every named bench counts
# priority_after I -> how many priority benches come after the I-th bench (1-based)
priority_after() {
  local n=0 j; for ((j = $1; j < ${#BENCHES[@]}; j++)); do is_priority "${BENCHES[$j]}" && n=$((n + 1)); done
  echo "$n"
}
BENCH_RESERVE=$(($(priority_after 0) * MIN_BENCH))

# ---- 2. tests ---------------------------------------------------------------------------------
last_line() { tail -n 1 "$PYTEST_LOG" | sed -E 's/^=+ //; s/ =+$//' | cut -c1-120; }
# run_tests LABEL CAP RESERVE FLOOR pytest-args...  (see step_timeout; -v in the log, so a run cut
# short still says what failed and where it was)
run_tests() {
  local label=$1 cap=$2 reserve=$3 floor=$4 t rc t0=$SECONDS start passed failed; shift 4
  t=$(step_timeout "$cap" "$reserve" "$floor")
  if [ "$t" = 0 ]; then note "$label" "SKIPPED (time budget spent)"; FAILED=1; return; fi
  echo "== pytest $* (timeout ${t}s, full log in $PYTEST_LOG)"
  echo "== pytest $*" >> "$PYTEST_LOG"
  start=$(($(wc -l < "$PYTEST_LOG") + 1))
  timeout -k 5 "$t" "$PY" -m pytest -v -rfEs -p no:cacheprovider --durations=10 "$@" >> "$PYTEST_LOG" 2>&1
  rc=$?
  tail -n +"$start" "$PYTEST_LOG" > "$WORK/this.log"
  passed=$(grep -cE " PASSED( |$)" "$WORK/this.log"); failed=$(grep -cE " (FAILED|ERROR)( |$)" "$WORK/this.log")
  if grep -qE "^(FAILED|ERROR) " "$WORK/this.log"; then  # pytest's own summary, with the messages
    grep -E "^(FAILED|ERROR) " "$WORK/this.log" | cut -c1-200 | head -n 20
  else  # cut short: the failures seen so far
    grep -E " (FAILED|ERROR)( |$)" "$WORK/this.log" | sed -E 's/ +\[ *[0-9]+%\]$//' | head -n 20
  fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "-- cut at ${t}s while running: $(tail -n 1 "$WORK/this.log" | cut -c1-150)"
    note "$label" "TIMEOUT after ${t}s ($passed passed, $failed failed so far)"; FAILED=1; return
  fi
  last_line
  if [ "$rc" = 5 ] && [ -n "${ALLOW_EMPTY:-}" ]; then
    note "$label" "none selected"
  elif [ "$rc" = 5 ]; then
    note "$label" "FAILED: no tests collected"; FAILED=1
  elif [ "$rc" != 0 ]; then
    note "$label" "$(describe_rc "$rc" "$t"): $(last_line)"; FAILED=1
  else
    note "$label" "ok ($((SECONDS - t0))s): $(last_line)"
  fi
}
if [ -n "$SKIP_TESTS" ]; then
  note tests "skipped (--no-tests)"
elif [ -n "${GPU_CHECK_PYTEST:-}" ]; then
  : > "$PYTEST_LOG"
  # shellcheck disable=SC2086  # word splitting intended: a list of pytest arguments
  run_tests tests "$CAP_TEST" "$BENCH_RESERVE" 20 $GPU_CHECK_PYTEST
elif [ "$MODE" != smoke ]; then
  : > "$PYTEST_LOG"
  run_tests "cuda tests" "$CAP_TEST" "$BENCH_RESERVE" 20 -m cuda tests/
else
  note tests "skipped (--smoke)"
fi

# ---- 3. ceilings, then every bench ------------------------------------------------------------
NEW_JSON=()
i=0
for name in "${BENCHES[@]}"; do
  i=$((i + 1))
  if is_priority "$name"; then
    t=$(step_timeout "$CAP_BENCH" $(($(priority_after "$i") * MIN_BENCH)) "$MIN_BENCH")
    if [ "$t" = 0 ]; then note "bench $name" "SKIPPED (time budget spent)"; FAILED=1; continue; fi
  else
    t=$(step_timeout "$CAP_BENCH" 0 0)
    if [ "$t" -lt "$MIN_BENCH" ]; then note "bench $name" "not run (time budget spent; --only $name runs it)"; continue; fi
  fi
  echo "== bench_$name.py${BENCH_FLAG:+ $BENCH_FLAG} (timeout ${t}s)"
  touch "$WORK/stamp"  # results newer than the stamp belong to this run
  t0=$SECONDS
  # shellcheck disable=SC2086
  timeout -k 5 "$t" "$PY" "bench/bench_$name.py" $BENCH_FLAG --out "$RES"
  rc=$?
  # Whatever JSON appeared since the stamp is this bench's (normally one <name>-<device>-<date>.json).
  mapfile -t fresh < <(find "$RES" -maxdepth 1 -name "*.json" -newer "$WORK/stamp" | sort)
  NEW_JSON+=("${fresh[@]}")
  found=$(for f in "${fresh[@]}"; do basename "$f"; done | tr '\n' ' ')
  if [ "$rc" != 0 ]; then
    note "bench $name" "$(describe_rc "$rc" "$t")${found:+ (partial result kept)}"; FAILED=1
  elif [ -z "$found" ]; then
    note "bench $name" "FAILED: exited 0 but wrote no JSON in $RES"; FAILED=1
  else
    note "bench $name" "ok ($((SECONDS - t0))s) -> $found"
  fi
done

# Unmarked tests whose names say they touch a device path (they pick CUDA when it is there, or check
# GPU launch configs in the interpreter): CI runs them on CPU already, so only with time to spare.
if [ -z "${GPU_CHECK_PYTEST:-}" ] && [ -z "$SKIP_TESTS" ] && [ "$CAP_CPU_TEST" -gt 0 ]; then
  ALLOW_EMPTY=1 run_tests "device-path tests" "$CAP_CPU_TEST" 0 0 -m "not cuda and not slow" \
    -k "(cuda or gpu or device) and not bench" tests/
fi

# The device tool returns at most 8 files from $OUT: bundle the JSON files if there are more.
if [ -n "${OUT:-}" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar -czf "$WORK/results.tgz" -C "$OUT" $(cd "$OUT" && ls ./*.json) && rm -f "$OUT"/*.json \
    && mv "$WORK/results.tgz" "$OUT/results.tgz"
  note bundle "more than 8 files: the JSON results are in $OUT/results.tgz"
  NEW_JSON=()
  tar -xzf "$OUT/results.tgz" -C "$WORK" && NEW_JSON=("$WORK"/*.json)
fi

# ---- 4. summary, then the one short table last ------------------------------------------------
echo
echo "== summary ($((SECONDS))s in all, mode $MODE)"
printf '  %s\n' "${STATUS[@]}"
if [ "$FAILED" != 0 ]; then echo "gpu_check.sh: SOME STEPS FAILED (see above and $LOG)"; fi
if [ ${#NEW_JSON[@]} -gt 0 ]; then
  "$PY" bench/report.py "${NEW_JSON[@]}" || FAILED=1
elif [ -n "$TESTS_ONLY" ]; then
  echo "gpu_check.sh: --tests-only: no benchmarks run"
else
  echo "gpu_check.sh: no benchmark results to report"; FAILED=1
fi
exit "$FAILED"
