#!/usr/bin/env bash
# End-to-end check of subspec-chat in a real terminal (tmux): start the app on the bundled model,
# ask a question, and check the answer and the stats panel on the captured screen.
# Usage: [METHOD=subspec_sd] tests/tmux_chat.sh   (from the repository root, venv active)
set -euo pipefail

METHOD="${METHOD:-vanilla}"
# The console script once the package is installed; the module from a plain checkout.
if command -v subspec-chat >/dev/null; then APP="subspec-chat"; else APP="python -m subspec_tui.start"; fi
SESSION="subspec-chat-check-$$"
WORK="$(mktemp -d)"
export SUBSPEC_DATA_DIR="$WORK/data"   # isolated chat history
export SUBSPEC_CONFIG_DIR="$WORK/config"   # isolated profiles (a first start measures this machine)
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true; rm -rf "$WORK"' EXIT

capture() { tmux capture-pane -p -t "$SESSION"; }

wait_for() {  # wait_for TEXT TIMEOUT_S
    local deadline=$((SECONDS + $2))
    until capture | grep -q -- "$1"; do
        if ((SECONDS > deadline)); then
            echo "FAIL: '$1' did not appear within $2 s; screen:" >&2
            capture >&2
            exit 1
        fi
        sleep 1
    done
}

tmux new-session -d -s "$SESSION" -x 140 -y 40 \
    "cd '$PWD' && SUBSPEC_DATA_DIR='$SUBSPEC_DATA_DIR' SUBSPEC_CONFIG_DIR='$SUBSPEC_CONFIG_DIR' $APP --method $METHOD"
wait_for "$METHOD · chat\|$METHOD · new chat" 600      # status line once the model is loaded
tmux send-keys -t "$SESSION" "What is the capital of France?" Enter
wait_for "Paris" 300                                  # the answer streams in
wait_for "tokens/s       [0-9]" 60                      # stats panel filled by the generation
SCREEN="$(capture)"
echo "$SCREEN"
grep -q "CPU, no offload\|layers on GPU" <<<"$SCREEN" || { echo "FAIL: no device line in the stats panel" >&2; exit 1; }
grep -q "tau last/mean  [0-9]" <<<"$SCREEN" || { echo "FAIL: no tau in the stats panel" >&2; exit 1; }
echo "OK: subspec-chat answered and showed its stats"
