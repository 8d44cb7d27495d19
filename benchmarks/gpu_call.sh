#!/usr/bin/env bash
# One device call on a lent GPU machine, prepared here by `python benchmarks/gpu_inputs.py --wheels`:
# installs the carried wheels, unpacks the GLUE tarball, optionally reruns the probe benchmark, then
# runs the gpu grid with the time that is left, so the whole call ends inside the 10-minute limit.
# The device call: command `bash benchmarks/gpu_call.sh`, carry [".gpu/minilm", ".gpu/glue.tar.xz",
# ".gpu/wheels"], timeout_s 600. Unpack what comes back into results/gpu/ before the next call
# (benchmarks/README.md), since the machine's copy of the working tree is this checkout's.
#
#   SADRA_GPU_CALL_LIMIT  seconds the whole call may take (default 560)
#   SADRA_GPU_PROBE       1: run gpu_probe.sh (MiniLM) first, into results/gpu/probe_cost.json
#   SADRA_GPU_MPS         1 (default): run the cells under CUDA MPS where it starts; 0: never
#   SADRA_GPU_SHARE       1: run gpu_share.py first (16 processes, plain against MPS), into the grid
#                         folder's share.json; SADRA_GPU_SHARE_ARGS: its extra arguments (the CPU check's size)
#   SADRA_GPU_WHEELS      folder of wheels to install first (default .gpu/wheels; empty: none)
#   SADRA_GLUE_DIR        GLUE folder (default .gpu/glue, unpacked from .gpu/glue.tar.xz if missing)
#   and gpu_grid.sh's own variables (SADRA_GPU_GRID_SIZE=smoke is the CPU check the tests run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WHEELS=${SADRA_GPU_WHEELS-.gpu/wheels}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sadra-site "$WHEELS"/*.whl || { echo "gpu_call: the carried wheels did not install"; exit 3; }
  export PYTHONPATH="/tmp/sadra-site${PYTHONPATH:+:$PYTHONPATH}"
fi
GLUE=${SADRA_GLUE_DIR:-.gpu/glue}
if [ "$GLUE" = .gpu/glue ] && [ ! -d .gpu/glue ]; then
  tar -xJf .gpu/glue.tar.xz -C .gpu || { echo "gpu_call: carry .gpu/glue.tar.xz (benchmarks/gpu_inputs.py)"; exit 4; }
fi
python3 -c "import torch, transformers, peft, datasets
print('gpu_call:', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" || exit 5
if [ "${SADRA_GPU_PROBE:-0}" = 1 ]; then
  SADRA_GPU_PROBE_LIMIT=90 bash benchmarks/gpu_probe.sh --models minilm --glue-dir "$GLUE" \
    || echo "gpu_call: the probe benchmark failed; the grid runs anyway"
fi
if [ "${SADRA_GPU_SHARE:-0}" = 1 ]; then
  mkdir -p "${SADRA_GPU_GRID:-results/gpu}"
  PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}" timeout 240 python3 benchmarks/gpu_share.py --glue-dir "$GLUE" \
    --json "${SADRA_GPU_GRID:-results/gpu}/share.json" ${SADRA_GPU_SHARE_ARGS:-} || echo "gpu_call: the sharing benchmark failed; the grid runs anyway"
fi
# Cell processes without CUDA's multi-process service take turns on the GPU; under it their small
# kernels run side by side. Kept only if a CUDA context opens under the daemon; stopped on exit.
if [ "${SADRA_GPU_MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/sadra-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/sadra-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    echo "gpu_call: CUDA MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2> /dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "gpu_call: CUDA MPS did not start; the cells take turns on the GPU"
  fi
fi
# What is left, less the report and the tarball after the grid stops (and its 20 s kill grace).
left=$(( ${SADRA_GPU_CALL_LIMIT:-560} - SECONDS - 50 ))
[ "$left" -gt 60 ] || { echo "gpu_call: only ${left} s left for the grid"; exit 6; }
SADRA_GPU_LIMIT=$left SADRA_GLUE_DIR=$GLUE bash benchmarks/gpu_grid.sh
