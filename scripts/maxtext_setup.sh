#!/usr/bin/env bash
# Create a venv with MaxText 0.2.5 and the fewest packages its GPT-3 pre-training step needs on
# CPU (scripts/maxtext_step.py). MaxText's declared requirements (CUDA/TPU/torch stacks, GCS,
# ...) are skipped: maxtext goes in with --no-deps, then only what its training code imports.
#   usage: scripts/maxtext_setup.sh [VENV]    (default: $MAXTEXT_VENV or <repo>/.venv-maxtext)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${MAXTEXT_VENV:-$repo/.venv-maxtext}}"

py=""
for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py="$cand"
    break
  fi
done
[ -n "$py" ] || { echo "need Python 3.12 (python3.12 on PATH or ~/.pyenv/versions/3.12*)" >&2; exit 1; }

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" --no-deps maxtext==0.2.5

# With their own (small) dependencies. Pinned: the JAX stack, which the others must match.
deps=(
  "jax[cpu]==0.12.1" jaxlib==0.12.1  # newest 0.12.x; CPU backend
  flax==0.12.12              # nnx model, train state, logical sharding rules
  optax==0.2.8               # AdamW and the LR schedule
  orbax-checkpoint==0.12.8   # imported by maxtext.common.checkpointing (no checkpoint written)
  aqtp==0.9.0                # maxtext.layers.quantizations (the pip name of "aqt")
  qwix==0.1.8                # quantization, imported by layers and megablox kernels
  drjax==0.2.1               # maxtext.utils.diloco_sharding
  grain==0.2.18              # maxtext.input_pipeline
  pathwaysutils==0.1.13      # imported at the top of train.py and by elastic_utils
  transformers==5.25.0       # checkpointing -> hf_model_configs; tokenizer (no torch needed)
  ml-collections omegaconf pydantic jinja2  # pyconfig: base.yml loading and validation
  jaxtyping einshape immutabledict          # imported by tokamax (installed below)
  tiktoken sentencepiece     # maxtext.input_pipeline.tokenizer
  pillow                     # maxtext.multimodal.utils, imported via the decoder
  sympy                      # maxtext.layers.engram, imported by the decoder
)
"${pip[@]}" "${deps[@]}"

# Without their declared dependencies, which drag in GCS clients, tensorboardX and duckdb:
# tokamax (megablox ops, imported by layers.moe) imports xprof, which imports fire and six.
# (pip then notes their missing requirements: expected.)
"${pip[@]}" --no-deps tokamax==0.0.17 xprof==2.24.2
"${pip[@]}" fire six

"$venv/bin/python" - <<'EOF'
import jax, flax, maxtext.version as v
import maxtext.trainers.pre_train.train  # noqa: F401  (the whole import path of the step)
print(f"jax {jax.__version__} (jaxlib {jax.lib.__version__}), flax {flax.__version__}, "
      f"maxtext {v.__version__}")
print("maxtext ready")
EOF
