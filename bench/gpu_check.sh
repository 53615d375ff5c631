#!/usr/bin/env bash
# GPU readiness check (issue 12), one prepared script for a short GPU window: no download,
# no install. It uses the first Python that imports torch with CUDA plus transformers and peft
# (the machine's own environment, or .venv when it has them), runs dualign from this checkout
# (PYTHONPATH), and prints sampling tokens/s (HF; vLLM when installed), scoring tokens/s and
# the trainer's MFU for the shapes in bench/gpu_check.py. Results: ${OUT:-runs}/gpu_check.json.
# A hard limit of 9 minutes keeps it inside a 10-minute window.
set -u
cd "$(dirname "$0")/.."
for py in .venv/bin/python python3 python; do
  if command -v "$py" >/dev/null 2>&1 && "$py" - <<'PY' 2>/dev/null
import torch, transformers, peft
assert torch.cuda.is_available()
PY
  then PYTHON=$py; break; fi
done
if [ -z "${PYTHON:-}" ]; then
  echo "gpu_check: no Python here imports torch with CUDA, transformers and peft; nothing measured" >&2
  exit 2
fi
"$PYTHON" -c "import torch, transformers, peft; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__); import importlib.util as u; print('vllm:', 'installed' if u.find_spec('vllm') else 'not installed'); print('trl:', 'installed' if u.find_spec('trl') else 'not installed')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
out="${OUT:-runs}/gpu_check.json"
PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" timeout 540 "$PYTHON" bench/gpu_check.py --out "$out" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped at the 9-minute limit; what finished is printed above" >&2
exit $rc
