#!/usr/bin/env bash
# Regenerate every CPU-producible file in benchmarks/results/, each stamped by benchmarks/stamp.py
# (commit + dirty flag, machine, command, date, load average at start and end; planner files also
# name their cost models and baselines as run).
#
#   bash benchmarks/run_all.sh                  # the real run into benchmarks/results/ (~1-1.5 h)
#   bash benchmarks/run_all.sh --quick          # smoke versions of every step into a temp dir (minutes)
#   bash benchmarks/run_all.sh --quick --out D  # ... into D
#   bash benchmarks/run_all.sh --only bench_cpu2,attention_cpu    # some steps (names: --list)
#   bash benchmarks/run_all.sh --skip plan_quality
#
# Steps run one after another (never in parallel: the measured ones time the machine), print their
# progress, and the first failure stops the run with the step's name and exit status. At the end every
# expected file is checked for its stamp (python benchmarks/stamp.py check) and a summary lists what
# was written. The real run also fails if benchmarks/results/ holds a file that no step produces.
# benchmarks/results/gpu/ is regenerated only on a GPU machine: bash benchmarks/gpu_check.sh.
#
# Sizes of the real run (chosen so the whole run takes 1-1.5 hours on the shared 2-core machine; on
# 2026-12-04: plan_quality 34 min, the other non-profile steps 28 min):
#   profiles: as committed before (2 and 4 ranks, tiny model; tiny 8-layer depth pair);
#   bench_cpu2/4: 4 global batches, 1 warm-up, 9 / 7 interleaved repetitions;
#   hot_path_cpu: 15 steps, 3 interleaved runs per version;  precision_tiny: 30 steps;
#   hf_native_vs_native_cpu: 30 interleaved steps per path of 2,048 tokens (3 warm-up);
#   plan_quality: 5 workloads x 2 presets x 1 seed at batch 512 with the official planner at its
#   published 10 s per MILP (2-5 min per batch), plus 1,024 devices x 8,192 sequences;
#   planner_scaling, milp_backends, simulate, dryrun_64: their scripts' default grids.
# The environment variable PYTHON names the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

QUICK=0 OUT="" ONLY="" SKIP="" LIST=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --only) ONLY="${2:?--only needs step names}"; shift ;;
    --skip) SKIP="${2:?--skip needs step names}"; shift ;;
    --list) LIST=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1'" \
         "(valid: --quick, --out DIR, --only A,B, --skip A,B, --list)" >&2
       exit 2 ;;
  esac
  shift
done
if [[ ! -x "$PY" ]]; then
  echo "run_all.sh: no Python interpreter at '$PY' (run bash scripts/setup.sh, or set PYTHON)" >&2
  exit 2
fi
if [[ -z "$OUT" ]]; then
  if [[ $QUICK == 1 ]]; then OUT="$(mktemp -d /tmp/flexsp_run_all.XXXXXX)"; else OUT=benchmarks/results; fi
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/flexsp_run_all_work.XXXXXX)"   # scratch: training output dirs, caches
trap 'rm -rf "$WORK"' EXIT

STEPS=(profile_cpu2 profile_cpu4 profile_cpu2_tiny8_4of8 profile_cpu2_tiny8_full bench_cpu2 bench_cpu4
       attention_cpu precision_tiny hot_path_cpu hf_native_vs_native_cpu plan_quality planner_scaling milp_backends simulate
       dryrun_64)
STAMP=("$PY" benchmarks/stamp.py)
SIM=simulate; [[ $QUICK == 1 ]] && SIM=simulate_quick    # simulate_table.py --quick appends _quick

# files each step writes (stamped ones; a profile's cost-model JSON has a strict schema and is not)
files_of() {
  case "$1" in
    profile_*) echo "$1.md $1.report.json $1.png" ;;
    bench_cpu*) echo "$1.md $1.json $1.png" ;;
    attention_cpu) echo "attention_cpu.md" ;;
    precision_tiny) echo "precision_tiny.md precision_tiny.json precision_tiny.png" ;;
    hot_path_cpu) echo "hot_path_cpu.md hot_path_cpu.json" ;;
    hf_native_vs_native_cpu) echo "hf_native_vs_native_cpu.md hf_native_vs_native_cpu.json" ;;
    plan_quality) echo "plan_quality.md plan_quality.json plan_quality.png" ;;
    planner_scaling) echo "planner_scaling.md planner_scaling.json" ;;
    milp_backends) echo "milp_backends.md milp_backends.json" ;;
    simulate) echo "$SIM.md $SIM.json $SIM.png" ;;
    dryrun_64) echo "dryrun_64.md dryrun_64.json" ;;
  esac
}
unstamped_of() { case "$1" in profile_*) echo "$1.json" ;; esac; }

if [[ $LIST == 1 ]]; then
  for s in "${STEPS[@]}"; do echo "$s: $(files_of "$s") $(unstamped_of "$s")"; done
  exit 0
fi

# --- the steps ---------------------------------------------------------------------------------
profile() {   # profile NAME OVERRIDES...: flexsp-profile (Hydra: profile.* keys, the training tree's model.*)
  local name=$1; shift
  "${STAMP[@]}" wrap --md "$OUT/$name.md" --json "$OUT/$name.report.json" --png "$OUT/$name.png" -- \
    "$PY" -m flexsp.profile "profile.name=$name" "output_dir=$OUT" profile.progress=false "$@"
}
if [[ $QUICK == 1 ]]; then
  PROFILE_QUICK=(profile.max_len=128 profile.repeats=1 profile.validate_batches=1 "profile.modes=[ulysses]"
                 "profile.link_mb=[0.25,0.5]")
  step_profile_cpu2() { profile profile_cpu2 profile.world_size=2 profile.capacity_tokens=1024 \
    "${PROFILE_QUICK[@]}"; }
  step_profile_cpu4() { profile profile_cpu4 profile.world_size=4 profile.capacity_tokens=1024 \
    "${PROFILE_QUICK[@]}"; }
  step_profile_cpu2_tiny8_4of8() { profile profile_cpu2_tiny8_4of8 "${PROFILE_QUICK[@]}" model.layers=4 \
    profile.profile_layers=2; }
  step_profile_cpu2_tiny8_full() { profile profile_cpu2_tiny8_full "${PROFILE_QUICK[@]}" model.layers=4 \
    profile.profile_layers=0; }
else
  # max_len 2048: the lengths these two were first profiled at (the tiny model's context is now 4096,
  # which a 2 x 1024-token budget cannot hold)
  step_profile_cpu2() { profile profile_cpu2 profile.world_size=2 profile.capacity_tokens=1024 profile.max_len=2048; }
  step_profile_cpu4() { profile profile_cpu4 profile.world_size=4 profile.max_len=2048; }
  TINY8=(model=tiny model.layers=8 profile.max_len=512 profile.repeats=3 "profile.modes=[ulysses]"
         profile.validate_batches=2)
  step_profile_cpu2_tiny8_4of8() { profile profile_cpu2_tiny8_4of8 "${TINY8[@]}" profile.profile_layers=4; }
  step_profile_cpu2_tiny8_full() { profile profile_cpu2_tiny8_full "${TINY8[@]}" profile.profile_layers=0; }
fi

BENCH_NOTE="Taken on a 2-core machine that other jobs may share (the load averages above and in the stamp \
count the run's own busy ranks: about 2 with 2 ranks, about 4 with 4; more means other jobs ran too): load \
inflates and scatters absolute step times. Methods are interleaved and each median is of several \
repetitions so that load hits every method alike; the fastest-run cross-check is the least disturbed \
estimate. Cost model = the profile named above (its own file says when and under what load it was measured)."
bench() {     # bench NAME RANKS OVERRIDES...: flexsp-bench (stamps itself; the wrap adds the common stamp)
  local name=$1 ranks=$2; shift 2
  "${STAMP[@]}" wrap --md "$OUT/$name.md" --json "$OUT/$name.json" --png "$OUT/$name.png" -- \
    "$PY" -m flexsp.bench --nproc-per-node "$ranks" data=synthetic data.distribution=wikipedia \
    "bench.out=$OUT/$name" "output_dir=$WORK/$name" "$@"
}
if [[ $QUICK == 1 ]]; then
  BQ=(train.global_batch=16 data.sampler.global_batch_tokens=2048 data.corpus.max_doc_tokens=1024
      bench.batches=1 bench.warmup=1 bench.repeats=1 "bench.methods=[flexsp,static,best-homogeneous]")
  step_bench_cpu2() { bench bench_cpu2 2 "${BQ[@]}" "solver.cost_model=$OUT/profile_cpu2.json"; }
  step_bench_cpu4() { bench bench_cpu4 4 "${BQ[@]}" "solver.cost_model=$OUT/profile_cpu4.json" \
    bench.capacity_tokens=1024; }
else
  # deepspeed-ulysses runs in a DeepSpeed world of its own after the main one (not interleaved with it).
  BM="bench.methods=[flexsp,static,best-homogeneous,deepspeed-ulysses]"
  step_bench_cpu2() { bench bench_cpu2 2 data.corpus.max_doc_tokens=2048 train.global_batch=64 \
    data.sampler.global_batch_tokens=8192 "solver.cost_model=$OUT/profile_cpu2.json" bench.batches=4 \
    bench.warmup=1 bench.repeats=9 "$BM" "bench.note=\"$BENCH_NOTE\""; }
  step_bench_cpu4() { bench bench_cpu4 4 data.corpus.max_doc_tokens=4096 train.global_batch=64 \
    data.sampler.global_batch_tokens=12288 "solver.cost_model=$OUT/profile_cpu4.json" \
    bench.capacity_tokens=1024 bench.batches=4 bench.warmup=1 bench.repeats=7 "$BM" \
    "bench.note=\"$BENCH_NOTE 4 ranks x 1 thread share the 2 cores (oversubscribed).\""; }
fi

if [[ $QUICK == 1 ]]; then
  step_attention_cpu() { "$PY" benchmarks/attention.py --tokens 512 --degrees 1,2 --iters 1 \
    --out "$OUT/attention_cpu.md"; }
  step_precision_tiny() { "$PY" benchmarks/precision.py --steps 3 --files 10 --max-doc-tokens 256 \
    --work "$WORK/precision" --out "$OUT/precision_tiny"; }
  step_hot_path_cpu() { "$PY" benchmarks/hot_path.py --steps 3 --skip 1 --repeats 1 --work "$WORK/hot_path" \
    --worktree "$WORK/hot_path_before" --out "$OUT/hot_path_cpu"; }
  step_hf_native_vs_native_cpu() { "$PY" benchmarks/hf_native_vs_native.py --steps 3 --warmup 1 --tokens 256 \
    --layers 1 --out "$OUT/hf_native_vs_native_cpu"; }
  Q=(--quick)
else
  step_attention_cpu() { "$PY" benchmarks/attention.py --tokens 4096 --iters 3 \
    --out "$OUT/attention_cpu.md"; }
  step_precision_tiny() { "$PY" benchmarks/precision.py --steps 30 --work "$WORK/precision" \
    --out "$OUT/precision_tiny"; }
  step_hot_path_cpu() { "$PY" benchmarks/hot_path.py --steps 15 --repeats 3 --work "$WORK/hot_path" \
    --worktree "$WORK/hot_path_before" --out "$OUT/hot_path_cpu"; }
  step_hf_native_vs_native_cpu() { "$PY" benchmarks/hf_native_vs_native.py --steps 30 --warmup 3 \
    --tokens 2048 --out "$OUT/hf_native_vs_native_cpu"; }
  Q=()
fi
step_plan_quality() { "$PY" benchmarks/plan_quality.py "${Q[@]}" --out "$OUT/plan_quality.md"; }
step_planner_scaling() { "$PY" benchmarks/planner_scaling.py "${Q[@]}" --out "$OUT/planner_scaling.md"; }
step_milp_backends() { "$PY" benchmarks/milp_backends.py "${Q[@]}" --out "$OUT/milp_backends.md"; }
step_simulate() { "$PY" benchmarks/simulate_table.py "${Q[@]}" --out "$OUT/simulate"; }
step_dryrun_64() { "$PY" benchmarks/dryrun_table.py "${Q[@]}" --out "$OUT/dryrun_64"; }

# --- run them ----------------------------------------------------------------------------------
wanted() {    # is step $1 selected by --only / --skip?
  [[ -n "$ONLY" && ",$ONLY," != *",$1,"* ]] && return 1
  [[ -n "$SKIP" && ",$SKIP," == *",$1,"* ]] && return 1
  return 0
}
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  if [[ " ${STEPS[*]} " != *" $s "* ]]; then
    echo "run_all.sh: unknown step '$s' (valid: ${STEPS[*]})" >&2
    exit 2
  fi
done
SELECTED=()
for s in "${STEPS[@]}"; do wanted "$s" && SELECTED+=("$s"); done
mode=$([[ $QUICK == 1 ]] && echo quick || echo full)
head_rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
echo "[run_all] $mode run of ${#SELECTED[@]} step(s) into $OUT; commit $head_rev;" \
  "load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a); $(date -u +%FT%TZ)"
SUMMARY=()
T0=$(date +%s)
i=0
for s in "${SELECTED[@]}"; do
  i=$((i + 1))
  t=$(date +%s)
  echo "[run_all] ($i/${#SELECTED[@]}) $s: start, load $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo n/a)"
  rc=0
  "step_$s" || rc=$?
  if [[ $rc != 0 ]]; then
    echo "[run_all] FAILED: step $s exited $rc after $(( $(date +%s) - t )) s (output above); stopping" >&2
    exit 1
  fi
  files=() paths=()
  for f in $(files_of "$s"); do files+=("$f"); paths+=("$OUT/$f"); done
  for f in $(unstamped_of "$s"); do
    [[ -f "$OUT/$f" ]] || { echo "[run_all] FAILED: step $s did not write $OUT/$f" >&2; exit 1; }
  done
  if ! "${STAMP[@]}" check "${paths[@]}"; then
    echo "[run_all] FAILED: step $s left files without a complete stamp (above)" >&2
    exit 1
  fi
  SUMMARY+=("$(printf '%-26s %6d s  %s' "$s" $(( $(date +%s) - t )) "${files[*]} $(unstamped_of "$s")")")
  echo "[run_all] ($i/${#SELECTED[@]}) $s: done in $(( $(date +%s) - t )) s"
done

echo "[run_all] summary ($mode, $(( $(date +%s) - T0 )) s in all, into $OUT):"
printf '  %s\n' "${SUMMARY[@]}"
echo "  regenerated only on a GPU: bash benchmarks/gpu_check.sh (benchmarks/results/gpu/ left as it is)"
if [[ $QUICK == 0 && "$OUT" == benchmarks/results ]]; then
  expected=" "
  for s in "${STEPS[@]}"; do expected+="$(files_of "$s") $(unstamped_of "$s") "; done
  stray=()
  for f in "$OUT"/*; do
    b=$(basename "$f")
    [[ -d "$f" && "$b" == gpu ]] && continue
    [[ "$expected" == *" $b "* ]] || stray+=("$b")
  done
  if [[ ${#stray[@]} -gt 0 ]]; then
    echo "[run_all] FAILED: benchmarks/results/ holds files no step produces: ${stray[*]}" >&2
    echo "          (make a script produce them, or delete them)" >&2
    exit 1
  fi
fi
