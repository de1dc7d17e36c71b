# Source this for the environment every command here expects (tools/dev.sh sets the same).
#   source tools/env.sh
_ds_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_ds_root/${VENV:-.venv}/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset _ds_root
