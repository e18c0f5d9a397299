#!/usr/bin/env bash
# Debian packages the tests need (headless Chromium and its driver, Redis), and with
# --training-text the public-domain texts the demo model is trained on. Installs only what
# is missing, so a second run costs nothing.
set -euo pipefail

packages=(chromium chromium-driver redis-server)
if [[ "${1:-}" == "--training-text" ]]; then
  packages=(dict-jargon dict-devil python3.11-doc)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
