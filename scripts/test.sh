#!/usr/bin/env bash
# Installs everything the test suite needs — Debian packages included — and runs the whole suite.
#   ./scripts/test.sh                       (as root: installs missing packages with apt-get)
#   DOORMAN_NODE_MAJOR=22 ./scripts/test.sh  (on Node.js 22; default: the system's if >= 22.19, else 24)
# Tests start their own Postfix, smtp-sink and doorman processes on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real: Postfix (smtpd, smtp-sink, smtp-source), swaks,
# swaks's TLS (Net::SSLeay, not pulled in without recommends), Cyrus SASL (AUTH against Postfix), dnsmasq and rbldnsd (DNS records and lists), redis-server (shared state, Cluster, Sentinel), prometheus (dashboard queries), openssl (test certificates), script(1) from bsdutils,
# the content scanners the scanner rules talk to (clamd, spamd, rspamd; the tests start their own
# instances with a signature file they write: nothing is downloaded), miltertest (milter protocol cases).
PACKAGES=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl libsasl2-modules sasl2-bin dnsmasq-base rbldnsd redis-server redis-tools prometheus openssl bsdutils ca-certificates clamav-daemon spamassassin spamd rspamd miltertest)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# Node.js >= 22.19: the system's, or the current LTS downloaded into .node/ (scripts/node.sh);
# DOORMAN_NODE_MAJOR=22 or 24 runs the suite on that line.
. scripts/node.sh
use_supported_node

npm ci --no-audit --no-fund
npm run lint
npm test
