#!/usr/bin/env bash
# scripts/gpu_check.sh [--dry-run] [--cpu] [--only sft:fsdp,dpo:zero3] [--out FILE] [--nproc N] [--steps N]
#
# Runs every dist option (ddp, fsdp, zero2, zero3) for SFT, DPO and PPO under torchrun on a small
# Qwen2-shaped model built from a config (no hub), and writes a markdown table (the GPU's name,
# the date, versions, pass/fail and seconds per run) to docs/gpu_check.md. Sized for one GPU in
# under 8 minutes (12 short runs).
#
#   --dry-run   print the commands and run nothing (tests/test_dist.py composes each of them)
#   --cpu       run them on this CPU: the tiny model, 1 step, 2 processes over gloo
#   --only      a comma-separated list of method:dist pairs to run
#   --out       where the table goes (default docs/gpu_check.md; with --cpu, a temporary folder's)
#
# Expected results: "pass" (trained, model saved; PPO under every option included), "skipped" for
# zero2/zero3 without DeepSpeed (pip install 'align-cli[deepspeed]'); anything else is FAIL with
# the error's last line.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DRY=0 CPU=0 ONLY="" OUT="" NPROC="" STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cpu) CPU=1 ;;
    --only) ONLY="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --nproc) NPROC="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/align-gpu-check.XXXXXX")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$CPU" = 1 ]; then
  MODEL=tiny NPROC="${NPROC:-2}" STEPS="${STEPS:-1}" OUT="${OUT:-$WORK/gpu_check.md}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  MODEL="$WORK/small-model" NPROC="${NPROC:-1}" STEPS="${STEPS:-10}" OUT="${OUT:-$REPO/docs/gpu_check.md}"
fi

build_small_model() {  # a 4-layer, 256-wide Qwen2 on the tiny tokenizer, random weights (no hub)
  "$PYTHON" - "$MODEL" <<'EOF'
import sys
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from align_cli.modeling import TINY_TOKENIZER_DIR
tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
config = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                     tie_word_embeddings=True)
model = Qwen2ForCausalLM(config)
model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
EOF
}

command_for() {  # method dist run_dir -> the align command line (one string)
  local method="$1" dist="$2" run="$3" extra=""
  case "$method" in
    ppo) extra="method.args.per_device_train_batch_size=4 method.args.num_mini_batches=1 method.args.max_new_tokens=8" ;;
    *) extra="method.args.per_device_train_batch_size=4" ;;
  esac
  echo "$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NPROC -m align_cli.cli train method=$method dist=$dist" \
       "model.name_or_path=$MODEL method.args.max_steps=$STEPS data.eval_ratio=0 plot=false -q $extra output_dir=$run"
}

PAIRS=()
for method in sft dpo ppo; do
  for dist in ddp fsdp zero2 zero3; do
    pair="$method:$dist"
    if [ -z "$ONLY" ] || [[ ",$ONLY," == *",$pair,"* ]]; then PAIRS+=("$pair"); fi
  done
done

if [ "$DRY" = 1 ]; then
  for pair in "${PAIRS[@]}"; do command_for "${pair%%:*}" "${pair##*:}" "$WORK/${pair/:/-}"; done
  rm -rf "$WORK"
  exit 0
fi

[ "$MODEL" = tiny ] || build_small_model || { echo "gpu_check.sh: could not build the small model" >&2; exit 1; }
if [ "$CPU" = 1 ]; then DEVICE="CPU (--cpu: tiny model, $STEPS step, $NPROC processes over gloo)"
else DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"; DEVICE="${DEVICE:-no GPU found}"; fi
VERSIONS="$("$PYTHON" -c '
import importlib.metadata as m
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return "not installed"
print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "accelerate", "trl", "deepspeed")))')"
HAS_DS="$("$PYTHON" -c 'import importlib.util as u; print(int(u.find_spec("deepspeed") is not None))')"

ROWS=() FAILED=0 STARTED=$(date +%s)
for pair in "${PAIRS[@]}"; do
  method="${pair%%:*}" dist="${pair##*:}" run="$WORK/${pair/:/-}"
  start=$(date +%s%N)
  eval "$(command_for "$method" "$dist" "$run")" >"$run.out" 2>"$run.err"
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 )); seconds="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  last="$(grep -v '^\s*$' "$run.err" | grep -v -i warn | tail -1 | tr '|' '/' | cut -c1-200)"
  if [ "$rc" = 0 ] && [ -f "$run/summary.json" ] && [ -f "$run/config.json" ]; then
    result="pass"; note="model saved"
  elif [[ "$dist" == zero* ]] && [ "$HAS_DS" = 0 ] && grep -q "needs DeepSpeed" "$run.err"; then
    result="skipped"; note="DeepSpeed not installed"
  else
    result="FAIL"; note="exit $rc: $last"; FAILED=$((FAILED + 1))
  fi
  echo "$method dist=$dist: $result (${seconds}s) $note"
  ROWS+=("| $method | $dist | $result | $seconds | $note |")
done

mkdir -p "$(dirname "$OUT")"
{
  echo "# dist check: every dist option for SFT, DPO and PPO"
  echo
  echo "Written by \`scripts/gpu_check.sh$([ "$CPU" = 1 ] && echo " --cpu")\`; rerun it whenever a GPU is at hand."
  echo
  echo "- device: $DEVICE"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- versions: $VERSIONS"
  echo "- model: $([ "$MODEL" = tiny ] && echo "tiny" || echo "a 4-layer, 256-wide Qwen2 built from a config (random weights)"), $STEPS steps, $NPROC process(es)"
  echo "- total: $(( $(date +%s) - STARTED )) s, $FAILED failed"
  echo
  echo "| method | dist | result | seconds | note |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
} >"$OUT"
echo "gpu_check.sh: table written to $OUT"
rm -rf "$WORK"
[ "$FAILED" = 0 ]
