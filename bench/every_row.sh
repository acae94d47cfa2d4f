#!/usr/bin/env bash
# Issue 20's rows on one GPU machine, in three calls of under 10 minutes each (the device tool's limit per
# command); the machine stays up between them, so the checkpoint and documents built in call 1 serve the others
# (a call that lands on a fresh machine builds them again, ~50 s). Each call installs the carried wheels first.
#
#   CALL=1 bash bench/every_row.sh   # the real command with its defaults; the guide as written, its bf16 LoRA,
#                                    # TRL q/v with Liger at batch 4 and 8, on the same documents
#   CALL=2 bash bench/every_row.sh   # the command with qlora and with all-linear LoRA; TRL on the same
#                                    # all-linear set (language model only); the guide as written again
#   CALL=3 bash bench/every_row.sh   # the command with train.batch_size=auto (an 80 GB card's budget); the 7B
#                                    # rows beside the 7B guide as written; the profile of the default step and
#                                    # the numerics check at 3B
#
# Record with: python bench/results.py --add $OUT/train_command_3b.json --run NAME (the 3B calls under one NAME,
# so every ratio is against call 1's guide as written), and the 7B file under its own name.
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
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; git rev-parse --short HEAD 2>/dev/null;
  ls "$WORK/3b" 2>/dev/null | tr '\n' ' '; echo; } > "$OUT/machine.txt"
T0=$SECONDS
case "${CALL:-1}" in
  1) python3 bench/train_command.py --size 3b --docs 128 --recipes defaults --warmup 24 --steps 24 \
       --peers guide_qlora_as_written,guide_lora_bf16,trl_lora_b4_liger,trl_lora_b8_liger --work "$WORK" --out "$OUT" ;;
  2) python3 bench/train_command.py --size 3b --docs 128 --recipes qlora,all_linear --warmup 16 --steps 24 \
       --peers guide_qlora_as_written,trl_lora_b2_lm_linear --work "$WORK" --out "$OUT" ;;
  3) python3 bench/train_command.py --size 3b --docs 128 --recipes auto_80gb --peers "" --work "$WORK" --out "$OUT"
     python3 bench/train_speed.py --size 7b --samples 64 --warmup 16 --steps 16 --isolate --no-numerics \
       --variants guide_qlora_as_written,ours_lora_b2_liger,ours_qlora_b2_liger,ours_qlora_lowmem \
       --ckpt "$WORK/7b/model" --out "$OUT/7b" > "$OUT/train_speed_7b.log" 2>&1
     cp "$OUT/7b/train_speed_7b.json" "$OUT/" 2>/dev/null
     for f in "$OUT"/7b/log_*.txt; do [ -f "$f" ] && cp "$f" "$OUT/7b_$(basename "$f")"; done
     # the default step's profile and the numerics check, on call 1's checkpoint and documents, if the call's
     # 10 minutes allow (about a minute)
     [ $((SECONDS - T0)) -lt 480 ] && [ -f "$WORK/3b/model/config.json" ] && python3 bench/train_speed.py --size 3b --data "$WORK/3b/data_128" --ckpt "$WORK/3b/model" --samples 128 \
       --warmup 32 --steps 8 --variants ours_lora_b2_liger --profile ours_lora_b2_liger --out "$OUT/profile" \
       > "$OUT/profile_3b_defaults.log" 2>&1
     cp "$OUT/profile/train_speed_3b.json" "$OUT/train_speed_3b_profile.json" 2>/dev/null ;;
esac
echo "call ${CALL:-1} took $((SECONDS - T0)) s" | tee -a "$OUT/machine.txt"
