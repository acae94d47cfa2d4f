#!/usr/bin/env bash
# Issue 20's rows on one GPU machine, in calls of under 10 minutes each (the device tool's limit per command);
# the machine stays up between them when the calls follow closely, so the checkpoint and documents built once
# serve the others (a call that lands on a fresh machine builds them again, ~55 s). Each call installs the
# carried wheels first and leaves at most 8 files in $OUT (what the device tool returns; a ninth is dropped).
#
#   CALL=1 bash bench/every_row.sh   # the real command with its defaults; the guide as written, its bf16 LoRA,
#                                    # TRL q/v with Liger at batch 4 (its best: batch 8 was slower, 2026-12-03) (~440 s)
#   CALL=2 bash bench/every_row.sh   # the command with qlora and with all-linear LoRA; TRL on the same
#                                    # all-linear set (language model only); the guide as written   (~525 s)
#   CALL=3 bash bench/every_row.sh   # the command with train.batch_size=auto (an 80 GB card's budget), the
#                                    # guide as written; the default step's profile and the GPU numerics check (~440 s)
#   CALL=4 bash bench/every_row.sh   # 7B: the guide as written, lora, qlora and low-memory qlora, each in its own
#                                    # process; then the auto-batch probe's GPU test                        (~420 s)
#   CALL=5 bash bench/every_row.sh   # QLoRA's 4-bit products in the compiled layers, A/B: unpacked by tensor
#                                    # operations (the product) against bitsandbytes' operators there, and with
#                                    # compiled 4-bit vision blocks, each in its own process, beside the guide; then
#                                    # the unpacking's GPU test                                          (~380 s)
#   CALL=6 bash bench/every_row.sh   # a lead, A/B: qlora with and without double quantisation, each in its own
#                                    # process, interleaved over two rounds, beside the guide          (~480 s)
#   CALL=7 bash bench/every_row.sh   # the command with qlora and the guide as written; then the default step's
#                                    # profile (no numerics check)                                       (~420 s)
#
# Every call measures the guide as written itself, so each ratio is of one call even when a call lands on a fresh
# machine (as the 2026-12-03 run's third call did, seconds after the second). All four take about 31 minutes with
# one machine start, more than a session's 30 minutes of device time: a session runs three of them (the
# 2026-12-03 run's third call, auto and the 7B rows together, ran out of time in the 7B qlora row).
#
# Record with: python bench/results.py --add $OUT/train_command_3b.json --run NAME (the 3B calls under one NAME),
# the 7B file (train_speed_7b.json) under its own.
set -uo pipefail
OUT=${OUT:-bench/out}
WORK=${WORK:-/tmp/tcb}
WHEELS=${WHEELS:-.whl4}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# (no commit here: the device's copy of .git can lag the working tree; record the commit where the call was made)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc;
  echo "already built: $(ls "$WORK/3b" "$WORK/7b" 2>/dev/null | tr '\n' ' ')"; } > "$OUT/machine.txt"
T0=$SECONDS

collect() {  # every log into one file, the JSON results up from their folders, the folders gone: <= 8 files
  local f
  for f in "$OUT"/log_*.txt "$OUT"/peers/log_*.txt "$OUT"/7b/log_*.txt "$OUT"/ab/log_*.txt "$OUT"/*.log; do
    [ -f "$f" ] && { echo "===== ${f#$OUT/}"; cat "$f"; }
  done > "$OUT/logs.all" 2>/dev/null
  [ -f "$OUT/7b/train_speed_7b.json" ] && cp "$OUT/7b/train_speed_7b.json" "$OUT/"
  [ -f "$OUT/profile/train_speed_3b.json" ] && cp "$OUT/profile/train_speed_3b.json" "$OUT/train_speed_3b_profile.json"
  [ -f "$OUT/ab/train_speed_3b.json" ] && cp "$OUT/ab/train_speed_3b.json" "$OUT/train_speed_3b_ab.json"
  rm -rf "$OUT"/peers "$OUT"/7b "$OUT"/profile "$OUT"/ab "$OUT"/log_*.txt "$OUT"/*.log "$OUT"/peers_log_*.txt
  mv "$OUT/logs.all" "$OUT/logs.txt"
}
trap collect EXIT

case "${CALL:-1}" in
  1) python3 bench/train_command.py --size 3b --docs 128 --recipes defaults --warmup 16 --steps 16 \
       --peers guide_qlora_as_written,guide_lora_bf16,trl_lora_b4_liger --work "$WORK" --out "$OUT" ;;
  2) python3 bench/train_command.py --size 3b --docs 128 --recipes qlora,all_linear --warmup 16 --steps 16 \
       --peers guide_qlora_as_written,trl_lora_b2_lm_linear --work "$WORK" --out "$OUT" ;;
  3) python3 bench/train_command.py --size 3b --docs 128 --recipes auto_80gb --warmup 16 --steps 16 \
       --peers guide_qlora_as_written --work "$WORK" --out "$OUT"
     # the default step's profile (the warm-up's last optimizer step: 4 micro-batches it already ran) and the GPU
     # numerics check, on the same documents
     python3 bench/train_speed.py --size 3b --data "$WORK/3b/data_128" --ckpt "$WORK/3b/model" --samples 128 \
       --warmup 32 --steps 8 --variants ours_lora_b2_liger --profile ours_lora_b2_liger --out "$OUT/profile" \
       > "$OUT/profile_3b_defaults.log" 2>&1 ;;
  4) python3 bench/train_speed.py --size 7b --samples 64 --warmup 16 --steps 16 --isolate --no-numerics \
       --variants guide_qlora_as_written,ours_lora_b2_liger,ours_qlora_b2_liger,ours_qlora_lowmem \
       --ckpt "$WORK/7b/model" --out "$OUT/7b" > "$OUT/train_speed_7b.log" 2>&1
     # the auto-batch probe's GPU test (its peak-counter reset, 48f4138, shows in CALL=3: the run's logged peak)
     python3 -m pytest -q -ra -m gpu tests/test_gpu.py -p no:cacheprovider -k auto_batch > "$OUT/gpu_tests.log" 2>&1 ;;
  5) python3 bench/train_speed.py --size 3b --samples 64 --warmup 16 --steps 16 --isolate --no-numerics \
       --variants qlora-nf4 --ckpt "$WORK/3b/model" --out "$OUT/ab" > "$OUT/qlora_nf4_ab.log" 2>&1
     python3 -m pytest -q -ra -m gpu tests/test_gpu.py -p no:cacheprovider -k 4bit_weights > "$OUT/gpu_tests.log" 2>&1 ;;
  6) python3 bench/train_speed.py --size 3b --samples 64 --warmup 16 --steps 16 --isolate --repeat 2 --no-numerics \
       --variants qlora-quant --ckpt "$WORK/3b/model" --out "$OUT/ab" > "$OUT/qlora_quant_ab.log" 2>&1 ;;
  7) python3 bench/train_command.py --size 3b --docs 128 --recipes qlora --warmup 16 --steps 16 \
       --peers guide_qlora_as_written --work "$WORK" --out "$OUT"
     python3 bench/train_speed.py --size 3b --data "$WORK/3b/data_128" --ckpt "$WORK/3b/model" --samples 128 \
       --warmup 32 --steps 8 --no-numerics --variants ours_lora_b2_liger --profile ours_lora_b2_liger \
       --out "$OUT/profile" > "$OUT/profile_3b_defaults.log" 2>&1 ;;
esac
echo "call ${CALL:-1} took $((SECONDS - T0)) s" | tee -a "$OUT/machine.txt"
