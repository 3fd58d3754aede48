#!/usr/bin/env bash
# README.md's first command, run as a new user runs it: in a fresh clone, with a fresh venv and an empty llm-atc home
# (no engines installed, nothing from the Hugging Face Hub; the package index gives the venv its packages); the answer
# must be a chat completion. Stops what it started. The command serves on port 8000, as README says.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
cleanup() {
  if [ -x "$work/clone/.venv/bin/llm-atc" ]; then
    LLM_ATC_HOME="$work/home" "$work/clone/.venv/bin/llm-atc" stop llm-atc-demo >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
git clone -q "$root" "$work/clone"
cd "$work/clone"
first=$(awk '/^```bash$/ {inside=1; next} /^```$/ {if (inside) exit} inside' README.md)
echo "[readme] $first"
start=$(date +%s)
LLM_ATC_HOME="$work/home" bash -c "$first" > "$work/answer.json"
python3 - "$work/answer.json" <<'PY'
import json, sys
answer = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])  # serve's snippets, then curl's answer
assert answer["choices"][0]["message"]["role"] == "assistant", answer
print("[readme] the demo model answered:", json.dumps(answer["choices"][0]["message"]["content"]))
PY
echo "[readme] README's first command took $(( $(date +%s) - start ))s in a fresh venv"
