#!/usr/bin/env bash
# The loopback replicas test of deploy/ (bench/replicas.py): two `bitnest serve` replicas behind
# nginx with deploy/nginx.conf's rules. Installs nginx (Debian package) and the openai client
# if missing. Usage: bash bench/replicas.sh [--model M] [--parallel N]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "bench/replicas.sh: installing nginx (Debian package nginx-light)" >&2
  apt-get update -qq && { apt-get install -y -qq nginx-light || apt-get install -y -qq nginx; } >/dev/null
fi
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet 'openai>=1.40' \
  || python3 -m pip install --quiet --user --break-system-packages 'openai>=1.40'
cargo build --release --locked --bin bitnest
PATH="$PATH:/usr/sbin" python3 bench/replicas.py --bin target/release/bitnest "$@"
