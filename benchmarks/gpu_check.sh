#!/usr/bin/env bash
# The speed issue's GPU figures in one run, for a machine with a CUDA device (the device tool's machine has python3
# with torch, timm, OpenCV and numba; grad-cam, isal, Streamlit and Ray are not needed here):
#
#     bash benchmarks/gpu_check.sh                    # writes gpu.txt, cam.md, cam.log, speed.log into $OUT
#
# 1. bench_cam.py: forward, Grad-CAM layer4 and layer1..4 in one call, Score-CAM layer4, for full-size R50 and
#    R50-hybrid (224 px, random weights), then engine and export throughput at batch 32 (200 photos per export).
# 2. bench_speed.py: Eigen-CAM at layer1..4 and the forward in both memory formats (the per-device rule).
# DEVICE=cpu and QUICK=1 run the same commands small, on any machine (a check of the script, not a measurement).
set -uo pipefail
out="${OUT:-gpu_figures}"
device="${DEVICE:-cuda}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${QUICK:-0}" = 1 ]; then
    cam_args=(--width-mult 0.25 --size 64 --repeats 1 --warmup 0 --batch 4 --export-images 4 --scorecam-batch 64)
    speed_args=(--repeats 1 --warmup 0 --forward-models "demo R50")
else
    cam_args=(--repeats 20 --warmup 5 --batch 32 --export-images 200)
    speed_args=(--repeats 20 --warmup 5)
fi
{
    date -u
    if [ "$device" = cuda ]; then nvidia-smi -L; fi
    "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$out/gpu.txt"
status=0
timeout 420 "$py" benchmarks/bench_cam.py --device "$device" --no-reference --scorecam "${cam_args[@]}" \
    --markdown "$out/cam.md" 2>&1 | tee "$out/cam.log" || status=1
timeout 150 "$py" benchmarks/bench_speed.py --device "$device" "${speed_args[@]}" 2>&1 | tee "$out/speed.log" || status=1
exit $status
