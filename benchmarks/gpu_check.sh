#!/usr/bin/env bash
# The prepared device check: on one GPU, within 8 minutes, prints one JSON document on stdout (progress on
# stderr) with
#   device  the GPU, driver, torch and CUDA versions;
#   dag     every stage with profiles/gpu-256.yaml on a generated 2,000-image 256 px RGB set, training cut to
#           3 steps: wall time, peak RSS and peak GPU memory per stage (benchmarks/scale.py --profile);
#   cost    real-size training steps at half and all of the profile's batch: the profile's VAE and UNet and a
#           Stable Diffusion 1.5-shaped UNet with the rank-16 LoRA of profiles/lora-sd15-256.yaml: peak GPU
#           memory and step time (benchmarks/profile_cost.py --device cuda --profile-batches).
# Run it in the repository with the CUDA venv (`make venv CUDA=1`), or PYTHON=<an interpreter with the
# requirements>:   benchmarks/gpu_check.sh > gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 SYNTHMED_PROGRESS=0

"$PY" -c 'import json, subprocess, torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": torch.cuda.get_device_name(), "nvidia_smi": smi, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}))' > "$work/device.json"

start=$(date +%s)
timeout 300 "$PY" benchmarks/scale.py --sizes 2000 --resolution 256 --channels 3 --profile profiles/gpu-256.yaml \
  > "$work/dag.txt" || echo "{\"error\": \"scale.py exited $?\"}" > "$work/dag.txt"
timeout 120 "$PY" benchmarks/profile_cost.py --device cuda --profile-batches --models vae unet \
  > "$work/cost.json" || echo "{\"error\": \"profile_cost.py exited $?\"}" > "$work/cost.json"
timeout 60 "$PY" benchmarks/profile_cost.py --device cuda --profile-batches --models lora \
  --profile profiles/lora-sd15-256.yaml > "$work/lora.json" || echo "{\"error\": \"profile_cost.py exited $?\"}" > "$work/lora.json"

"$PY" - "$work" "$start" <<'EOF'
import json, sys, time
from pathlib import Path

work = Path(sys.argv[1])
first = lambda name: json.JSONDecoder().raw_decode((work / name).read_text().lstrip())[0]  # scale.py adds a table
cost = first("cost.json")
cost.setdefault("models", {}).update(first("lora.json").get("models", {}))
print(json.dumps({"device": first("device.json"), "dag": first("dag.txt"), "cost": cost,
                  "seconds": round(time.time() - int(sys.argv[2]))}, indent=1))
EOF
