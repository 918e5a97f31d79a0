#!/usr/bin/env bash
# Wall time of the whole LeNet-300-100 flagfile run (dense training, 4 x prune/retrain, every
# evaluation and checkpoint), process start to exit, in a fresh temporary workdir each time.
#
#   benchmarks/full_run.sh [REPEATS] [DATA_DIR]     # from anywhere; defaults 3, ../shared/data/mnist
#
# One line per run: wall, user and sys seconds, the run's own final line, and "others": the share
# of all CPUs that other processes used meanwhile (0% on a quiet machine; 50% = one of two cores
# taken by someone else, so the figure is disturbed).
set -euo pipefail
repeats="${1:-3}"
data_dir="${2:-../shared/data/mnist}"
cd "$(dirname "$0")/.."
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }  # user nice system irq softirq steal
hz="$(getconf CLK_TCK)"
ncpu="$(nproc)"
for i in $(seq "$repeats"); do
  workdir="$(mktemp -d)"
  b0="$(busy)"
  TIMEFORMAT='%R %U %S'
  { times_out="$( { time python -m lwc.experiments.lenet --flagfile=experiments/lenet_300_100.flags \
      --workdir="$workdir" --data_dir="$data_dir" > "$workdir/stdout" 2> "$workdir/stderr"; } 2>&1 )"; }
  b1="$(busy)"
  read -r real user sys <<< "$times_out"
  others="$(awk -v b="$((b1 - b0))" -v hz="$hz" -v u="$user" -v s="$sys" -v r="$real" -v n="$ncpu" \
      'BEGIN { f = (b / hz - u - s) / (r * n); if (f < 0) f = 0; printf "%.0f%%", 100 * f }')"
  printf 'run %d: %s s wall (user %s s, sys %s s, others %s) | %s\n' "$i" "$real" "$user" "$sys" \
      "$others" "$(tail -n 1 "$workdir/stdout")"
  rm -rf "$workdir"
done
