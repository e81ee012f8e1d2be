#!/usr/bin/env bash
# bf16 vs int8 vs int4 decode on the Mistral-7B shape, interleaved (the machine is shared: each round
# runs every format once, so a change in load hits them alike). One JSON line per run in $OUT.
#   scripts/bench_quant.sh BF16_DIR INT8_DIR INT4_DIR OUT.jsonl [ROUNDS] [BATCHES]
# The quantized dirs come from `python -m launch quantize BF16_DIR DIR --quantize int8|int4`.
set -euo pipefail
bf16=$1 int8=$2 int4=$3 out=$4 rounds=${5:-2} batches=${6:-"1 8"}
export OMP_WAIT_POLICY=PASSIVE
for batch in $batches; do
  for round in $(seq "$rounds"); do
    for fmt in bf16 int8 int4; do
      dir=${!fmt}
      line=$(python -m launch bench "$dir" --batch_size "$batch" --prompt_len 16 --new_tokens 8 --threads 2 \
             --warmup 1 --repeat 1 --json --quiet --dist_timeout 1800 --bandwidth 2>/dev/null | tail -1)
      echo "{\"format\": \"$fmt\", \"batch\": $batch, \"round\": $round, \"load\": $(cut -d' ' -f1 /proc/loadavg), \"report\": $line}" >> "$out"
      echo "$fmt batch $batch round $round done" >&2
    done
  done
done
