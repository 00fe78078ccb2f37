#!/usr/bin/env bash
# Installs doorman's dependencies, builds it and starts it on working defaults:
# listening on 127.0.0.1:2525, relaying to the MTA on 127.0.0.1:25, rules from rules/, state in
# memory, the system's DNS resolver. Override with DOORMAN_* variables (see README) or a
# doorman.yaml in this folder. Stop with Ctrl-C (SIGTERM/SIGINT drain open sessions).
#   ./scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "doorman needs Node.js 20 or newer (found: $(node --version 2>/dev/null || echo none))." >&2
  echo "On Debian/Ubuntu: install nodejs >= 20 from your distribution or nodejs.org, then run this again." >&2
  exit 1
fi

npm ci --no-audit --no-fund
npm run build
node bin/doorman.js check
# A 64 MB young generation: fewer garbage-collection pauses under load (docs/operations.md, Tuning).
export NODE_OPTIONS="${NODE_OPTIONS:---max-semi-space-size=64}"
exec node bin/doorman.js start
