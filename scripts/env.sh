# Source this file to build meduet by hand: it points tch's build at the project's Python venv.
#   . scripts/env.sh && cargo build --release
MEDUET_VENV="${MEDUET_VENV:-$HOME/.cache/meduet/venv}"
export MEDUET_VENV
export VIRTUAL_ENV="$MEDUET_VENV"
export PATH="$MEDUET_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
