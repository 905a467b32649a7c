#!/usr/bin/env bash
# The MQRAR sweep on one GPU: one process per (attention, seed), all sharing the GPU (a 2-layer,
# width-128 model leaves it mostly idle, and each process makes its own batches on a CPU core),
# then one summary.json and mqrar.png in WORKDIR.
#
#   experiments/mqrar_sweep.sh WORKDIR [SECONDS] [--config.field=value ...]
#
# SECONDS (default: no limit) stops every process after that long; the runs finished by then are
# in the summary. Each seed takes the key counts in another order, so a sweep cut short still
# covers every key count.
set -uo pipefail
workdir=$1
limit=${2:-0}
shift $(( $# > 1 ? 2 : 1 ))
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
# 9 processes share one GPU: each takes a slice of its memory, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.08}
mkdir -p "$workdir"
key_orders=("(16,32,64)" "(32,64,16)" "(64,16,32)")
for attention in stickbreaking softmax_rope softmax_nope; do
  for seed in 0 1 2; do
    name=$attention-seed$seed
    timeout "$limit" "$python" "$here/mqrar.py" --config="$here/configs/mqrar.py:sweep" \
        --workdir="$workdir/$name" "--config.attentions=('$attention',)" "--config.seeds=($seed,)" \
        "--config.num_keys=${key_orders[$seed]}" "$@" > "$workdir/$name.log" 2>&1 &
  done
done
wait
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
    'import sys, mqrar_lib; mqrar_lib.merge(sys.argv[1])' "$workdir"
