#!/usr/bin/env bash
# Installs doorman's dependencies, builds it and starts it on working defaults:
# listening on 127.0.0.1:2525, relaying to the MTA on 127.0.0.1:25, rules from rules/, state in
# memory, the system's DNS resolver. Override with DOORMAN_* variables (see README) or a
# doorman.yaml in this folder. Stop with Ctrl-C (SIGTERM/SIGINT drain open sessions).
#   ./scripts/install.sh                       (DOORMAN_NODE_MAJOR=22 for Node.js 22; see scripts/node.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

# Node.js >= 22.19: the system's, or the current LTS downloaded into .node/ (scripts/node.sh,
# DOORMAN_NODE_MAJOR=22 or 24 to choose the line). Everything below runs on it, doorman included:
# a service of your own starts "$DOORMAN_NODE" bin/doorman.js start (printed below).
. scripts/node.sh
use_supported_node

npm ci --no-audit --no-fund
npm run build
"$DOORMAN_NODE" bin/doorman.js check
# A 32 MB young generation: fewer garbage-collection pauses under load (docs/operations.md, Tuning).
export NODE_OPTIONS="${NODE_OPTIONS:---max-semi-space-size=32}"
echo "starting: $DOORMAN_NODE bin/doorman.js start"
exec "$DOORMAN_NODE" bin/doorman.js start
