#!/usr/bin/env bash
# Installs Debian's Chromium for the demo's headless browser test (demo-services/tests/live_page.rs).
# Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
