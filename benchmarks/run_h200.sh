#!/usr/bin/env bash
# One device call: install lsa-rewrite into the image's python (offline), then the GPU checks and
# benchmarks. Usage (on the GPU machine, from the repo root): bash benchmarks/run_h200.sh STAGE
#   STAGE=quick : recall kernel check + bandwidth/overlap, selection cost alone, `python -m lsa_rewrite.selftest --gpu` (decode attention alone: python3 benchmarks/decode_attention.py)
#   STAGE=profile: Nsight Compute over the MQA decode-attention kernels (512K batch 1, 128K batch 8), stall reasons
#   STAGE=e2e   : the Llama-3-8B-shaped end-to-end benchmark at 128K (128 steps): HF compiled StaticCache,
#                 our runtime in mode="dense", LSA (recall_lag 4 and 0)
#   STAGE=kernels: decode attention (LSA vs dense SDPA, both layouts) and mirror pinning
#   STAGE=soak  : new prompt lengths reuse the compiled step (compile time, TTFT: LSA, runtime dense, HF) and a
#                 10,000-step LSA soak (recompiles, device memory, RSS) on a Llama-3.2-1B shape (~5 minutes)
#   STAGE=host  : host memory per sequence and decode ms/token at 128K for offload (exact mirror), offload
#                 (fp8 mirror) and evict (benchmarks/host_memory.py, ~4 minutes)
#   STAGE=concurrency: the largest batch of 128K sequences per mode, allocated (prefilled one at a time into one
#                 store) and decoded together: runtime dense, LSA exact mirror, LSA fp8 mirror (~8 minutes)
#   STAGE=concurrency-evict: the same for LSA evict (~8.5 minutes), merged with benchmarks/results/concurrency.json
#                 (the first stage's JSON, copied into the tree before this call)
#   STAGE=full  : the end-to-end benchmark at 128K and 32K, 256 steps, the same three paths (~6 minutes; runs
#                 that would start after 480 s are skipped and listed in the JSON)
#   (kernels alone: python3 benchmarks/check_kernels_gpu.py --out FILE)
# Results land in $OUT (the device tool brings them back) or benchmarks/results/.
set -euo pipefail
STAGE=${1:-quick}
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "$STAGE" = quick ]; then
  python3 benchmarks/recall.py --out "$OUT/recall.json" || echo "recall FAILED rc=$?"
  python3 benchmarks/selection.py --out "$OUT/selection.json" || echo "selection FAILED rc=$?"
  # from outside the repo: its root would shadow the installed package (kernels/ installs inside lsa_rewrite)
  (out=$(realpath "$OUT") && cd /tmp && python3 -m lsa_rewrite.selftest --gpu --out "$out/selftest_gpu.json") || echo "selftest FAILED rc=$?"
elif [ "$STAGE" = kernels ]; then
  python3 benchmarks/decode_attention.py --out "$OUT/decode_attention.json" || echo "decode_attention FAILED rc=$?"
  python3 benchmarks/pinning.py --gib 8.25 --out "$OUT/pinning.json" || echo "pinning FAILED rc=$?"
elif [ "$STAGE" = profile ]; then
  # Nsight Compute over the MQA cases still above 1.5x the floor: batch 1 at 512K, batch 8 at 128K
  # (split kernel + merge of one call), with the warps' stall reasons per issued instruction
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
  for case in "--batch 1 --context 524288" "--batch 8 --context 131072"; do
    "${NCU:-ncu}" --clock-control none --kernel-name regex:_decode_ --launch-skip 4 --launch-count 2 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 benchmarks/profile_decode.py --layout mqa $case \
      > "$OUT/ncu_mqa_${case// /_}.txt" 2>&1 || echo "ncu FAILED rc=$? ($case)"
  done
elif [ "$STAGE" = soak ]; then
  python3 benchmarks/recompile_soak.py --time-budget-s 420 --out "$OUT/recompile_soak.json"
elif [ "$STAGE" = host ]; then
  python3 benchmarks/host_memory.py --context 131072 --steps 256 --out "$OUT/host_memory.json"
elif [ "$STAGE" = concurrency ]; then
  python3 benchmarks/concurrency.py --modes runtime_dense,lsa_exact,lsa_fp8 --time-budget-s 540 --out "$OUT/concurrency.json"
elif [ "$STAGE" = concurrency-evict ]; then
  python3 benchmarks/concurrency.py --modes lsa_evict --merge benchmarks/results/concurrency.json --time-budget-s 520 --out "$OUT/concurrency.json"
elif [ "$STAGE" = e2e ]; then
  python3 benchmarks/e2e_decode.py --contexts 131072 --steps 128 --lags 4,0 --time-budget-s 480 --out "$OUT/e2e_decode.json"
else
  python3 benchmarks/e2e_decode.py --contexts 131072,32768 --steps 256 --lags 4,0 --time-budget-s 480 --out "$OUT/e2e_decode.json"
fi
