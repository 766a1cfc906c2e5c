#!/usr/bin/env bash
# Install the benchmark's peers on this machine (Debian). None is a dependency of lmproxy.
#   - Debian's wrk (load generator) and nginx (the C reference proxy)
#   - into bench/.peers, a virtualenv of their own: vllm-router, sglang-router,
#     litellm[proxy] and aiohttp (the aiohttp proxy peer), plus matplotlib here for charts.
set -euo pipefail
cd "$(dirname "$0")"
if command -v apt-get >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq wrk nginx
  # The Debian package starts a system nginx on port 80; the benchmark runs its own.
  $sudo_cmd systemctl disable --now nginx 2>/dev/null || $sudo_cmd service nginx stop 2>/dev/null || true
fi
python3 -m venv .peers
.peers/bin/pip install --quiet --upgrade pip
.peers/bin/pip install --quiet vllm-router sglang-router 'litellm[proxy]' aiohttp
python3 -m pip install --quiet aiohttp matplotlib
echo "peers installed: $(ls .peers/bin | grep -E '^(vllm-router|sglang-router|litellm)$' | tr '\n' ' ')"
