#!/usr/bin/env bash
# The one prepared GPU measurement of issue 14 (README, "Throughput"). For each of the five scripts at the paper's
# VOC configuration on generated data (--data synthetic-voc; --init none, as the weights cannot be downloaded there
# and do not change the speed), in this order, so that a run cut short still has the most important rows:
#   1. --benchmark $N in bf16, eager          2. the same with --no-amp (float32, TF32 as the script sets it)
#   3. bf16 with --compile                    4. --no-amp with --compile
#   5. --benchmark $N_SYNC in bf16 under torch.cuda.set_sync_debug_mode("warn") (SEG_SYNC_DEBUG=1): the syncs
#      inside the timed window, counted with their source lines in benchmark.json (the loop's closing log line is one)
#   6. with two or more GPUs: hung2018 on --device cuda:1 while nvidia-smi is polled: which GPUs hold memory
# and writes every benchmark.json, the logs and table.md (markdown, also printed) into $BENCH_OUT.
#
#   BENCH_OUT=/some/folder bash results/gpu_benchmark.sh          # on the GPU machine, from the repository root
#   GPU_BENCH_TINY=1 bash results/gpu_benchmark.sh                # the CPU check of this script: tiny networks,
#                                                                 # 2 iterations, 65x65 crops, batch 2, eager backend
# Environment: PYTHON (python), BENCH_OUT (results/gpu_benchmark_out), N (50), N_SYNC (20), SCRIPTS (all five),
# RUN_TIMEOUT (seconds per run, 900), SKIP_COMPILE=1 (steps 3-4 left out), WORKERS (the scripts' default).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUTDIR=${BENCH_OUT:-results/gpu_benchmark_out}
N=${N:-50}
N_SYNC=${N_SYNC:-20}
SCRIPTS=${SCRIPTS:-"hung2018 latent_classes luc2016 s4gan_mlmt dual_disc"}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
COMMON=(--data synthetic-voc --init none)
[ -n "${WORKERS:-}" ] && COMMON+=(--workers "$WORKERS")
declare -A SMALL=()
if [ "${GPU_BENCH_TINY:-0}" = 1 ]; then
    N=2; N_SYNC=2
    export SEG_COMPILE_BACKEND=eager OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    COMMON+=(--device cpu --batch-size 2 --crop-size 65 65)
    SMALL[hung2018]="--backbone resnet18 --width 8 --ndf 8"
    SMALL[latent_classes]="--backbone resnet18 --width 8 --ndf 8"
    SMALL[luc2016]="--segmenter farabet --width 4 --adversary largefov-light"
    SMALL[s4gan_mlmt]="--backbone resnet18 --width 8 --ndf 8"
    SMALL[dual_disc]="--backbone resnet14 --width-per-group 4 --aspp-channels 16 --ndf 8"
fi
mkdir -p "$OUTDIR"
: > "$OUTDIR/status.txt"
{ date -u; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"; } > "$OUTDIR/machine.txt" 2>&1

run() {   # run TAG SCRIPT ARGS...: one benchmark into $OUTDIR/TAG, its exit status into status.txt
    local tag=$1 script=$2; shift 2
    rm -rf "${OUTDIR:?}/$tag"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    timeout "$RUN_TIMEOUT" "$PYTHON" "$script.py" "${COMMON[@]}" ${SMALL[$script]:-} --out "$OUTDIR/$tag" "$@" \
        > "$OUTDIR/$tag.log" 2>&1
    local rc=$?
    echo "$tag rc=$rc $((SECONDS - t0))s: $script.py ${COMMON[*]} ${SMALL[$script]:-} $*" | tee -a "$OUTDIR/status.txt"
    grep "^benchmark:" "$OUTDIR/$tag.log" || tail -n 3 "$OUTDIR/$tag.log"
}

for s in $SCRIPTS; do run "${s}_bf16_eager" "$s" --benchmark "$N"; done
for s in $SCRIPTS; do run "${s}_fp32_eager" "$s" --benchmark "$N" --no-amp; done
if [ "${SKIP_COMPILE:-0}" != 1 ]; then
    for s in $SCRIPTS; do run "${s}_bf16_compile" "$s" --benchmark "$N" --compile; done
    for s in $SCRIPTS; do run "${s}_fp32_compile" "$s" --benchmark "$N" --no-amp --compile; done
fi
for s in $SCRIPTS; do SEG_SYNC_DEBUG=1 run "${s}_bf16_syncdebug" "$s" --benchmark "$N_SYNC"; done

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${GPUS:-0}" -ge 2 ]; then
    # which GPUs hold memory while a run on cuda:1 trains: the highest memory.used per GPU, polled every second
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits > "$OUTDIR/cuda1_before.csv"
    run hung2018_bf16_cuda1 hung2018 --benchmark "$N_SYNC" --device cuda:1 &
    pid=$!
    : > "$OUTDIR/cuda1_poll.csv"
    while kill -0 "$pid" 2>/dev/null; do
        nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits >> "$OUTDIR/cuda1_poll.csv"
        sleep 1
    done
    wait "$pid"
    "$PYTHON" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/cuda1_memory.txt"
import sys
out = sys.argv[1]
read = lambda p: [tuple(int(v) for v in line.split(",")) for line in open(p) if line.strip()]
before = dict(read(f"{out}/cuda1_before.csv"))
peak = {}
for gpu, mib in read(f"{out}/cuda1_poll.csv"):
    peak[gpu] = max(peak.get(gpu, 0), mib)
print("GPU  MiB before  MiB peak during the cuda:1 run  (a run on cuda:1 should raise only GPU 1)")
for gpu in sorted(peak):
    print(f"{gpu:>3}  {before.get(gpu, 0):>10}  {peak[gpu]:>10}")
EOF
else
    echo "fewer than two GPUs: the --device cuda:1 check is left out" | tee -a "$OUTDIR/status.txt"
fi

"$PYTHON" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/table.md"
import glob, json, os, sys
out = sys.argv[1]
fmt = lambda v, f: "n/a" if v is None else format(v, f)
rows = []
for path in sorted(glob.glob(os.path.join(out, "*", "benchmark.json"))):
    tag = os.path.basename(os.path.dirname(path))
    r = json.load(open(path))
    graphs = "-" if r["graphs_compiled_in_warmup"] is None else \
        f"{r['graphs_compiled_in_warmup']} / {r['graphs_compiled_in_timed_window']}"
    syncs = "-" if r["sync_warnings"] is None else \
        f"{r['sync_warnings']['count']} ({', '.join(r['sync_warnings']['where']) or 'none'})"
    rows.append(f"| {tag} | {r['device']} | {r['dtype']} | "
                f"{'on' if r['compile'] else 'off'} | {r['batch_size']} | "
                f"{'x'.join(map(str, r['crop'] or r['resize'] or ['-']))} | "
                f"{r['iterations']} | {r['iterations_per_s']:.2f} | {r['images_per_s']:.1f} | "
                f"{100 * r['data_wait_share']:.1f} | {fmt(r['peak_gpu_memory_gib'], '.1f')} | "
                f"{r['flops_per_iteration'] / 1e9:.4g} | {r['achieved_tflops']:.3g} | "
                f"{fmt(r['fraction_of_peak'] and 100 * r['fraction_of_peak'], '.1f')} | {graphs} | {syncs} |")
print(f"Measured with `bash results/gpu_benchmark.sh` (synthetic-voc, the paper's VOC preset, --init none); "
      f"torch {r['torch'] if rows else '?'}.\n")
print("| run | device | dtype | compile | batch | crop | iterations | it/s | img/s | data wait % | peak GiB | "
      "GFLOP/it | TFLOP/s | % of bf16 peak | graphs (warm-up / timed) | syncs in window |")
print("|" + "---|" * 16)
print("\n".join(rows))
failed = [line for line in open(os.path.join(out, "status.txt")) if " rc=" in line and " rc=0 " not in line]
if failed:
    print("\nRuns that failed (see their .log):\n" + "".join("    " + line for line in failed))
EOF
