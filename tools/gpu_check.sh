#!/usr/bin/env bash
# One GPU check, for a CUDA machine: the gpu-marked tests, a PartitionSel run on 1 GPU with NCCL
# (launch/train.py under the deepspeed launcher, bf16), and bench_sketch / bench_step on CUDA.
# Writes $OUT/gpu_check.json (one summary) plus each part's own JSON and log. Budget: < 8 min.
#
#   OUT=runs/gpu_check bash tools/gpu_check.sh
#
# Packages the machine's image lacks (deepspeed, pydantic, ...) may come as wheels in .whl/;
# they are installed into /tmp/site first. The model: .cache/models/smollm2-135m when present,
# else a tiny Llama from a config with that folder's (or --tokenizer's) tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=.cache/models/smollm2-135m
POOL=$OUT/pool

part() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/parts.jsonl"
    tail -3 "$OUT/$name.log" >&2
}

: >"$OUT/parts.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0)}))" >"$OUT/torch.json" 2>&1

part gpu_tests 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py tests/test_megatron.py -p no:cacheprovider
# torchtitan's own Trainer on PartitionSel batches (torchtitan 0.3.0 + torchdata as wheels in .whl/; skipped without)
part torchtitan_trainer 240 "$PY" -m pytest -q -m gpu tests/test_titan.py -p no:cacheprovider
if [ -f "$MODEL/config.json" ] && ls "$MODEL"/*.safetensors >/dev/null 2>&1; then MODEL_ARGS=(--model "$MODEL" --num-layers 6)
else MODEL_ARGS=(--tiny llama --tokenizer "$MODEL"); fi
if [ -f .cache/demo_data/train.jsonl ]; then
    part build_pool 90 "$PY" tools/build_pool.py --tokenizer "$MODEL" --train .cache/demo_data/train.jsonl \
        --valid .cache/demo_data/valid.jsonl --max-length 256 --out "$POOL" --overwrite --quiet
    part train_1gpu_nccl_bf16 150 deepspeed --num_gpus 1 --master_addr 127.0.0.1 --master_port 29533 \
        launch/train.py "${MODEL_ARGS[@]}" --pool "$POOL" --deepspeed_config ds_configs/zero2_bf16.json \
        --steps 6 --output-dir "$OUT/train"
fi
if [ -f "$MODEL/config.json" ]; then
    part bench_sketch 120 "$PY" tools/bench_sketch.py --device cuda --out "$OUT/bench_sketch.json"
    part bench_step 120 "$PY" tools/bench_step.py --ranks 1 --stages 2 --out "$OUT/bench_step.json"
fi

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
summary = {"parts": [json.loads(l) for l in open(os.path.join(out, "parts.jsonl"))]}
for name in ("torch.json", "bench_sketch.json", "bench_step.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        try:
            summary[name[:-5]] = json.load(open(path))
        except ValueError:
            summary[name[:-5]] = open(path).read()[-2000:]
metrics = os.path.join(out, "train", "metrics.jsonl")
if os.path.exists(metrics):
    summary["train_records"] = [json.loads(l) for l in open(metrics)][-3:]
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1, default=str)
for p in summary["parts"]:
    print(f"{p['part']:>22}  rc {p['rc']:>3}  {p['seconds']:>4} s")
PY
