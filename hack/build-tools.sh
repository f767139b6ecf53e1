#!/usr/bin/env bash
# Builds the local cluster's tools from pinned sources into a cache keyed by the pins.
# A warm cache makes this a no-op. Usage: hack/build-tools.sh [--print-bin-dir]
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="$HACK_DIR/tools"
PROMETHEUS_DEB_VERSION="2.42.0+ds-5+deb12u1"

# Bump when the way the tools are built changes (flags, sources), so caches are rebuilt.
RECIPE_VERSION=1

# The control plane's tools name the cache directory; checkers added later (kube-score) are built
# into it too, each with a stamp of its own pins, so adding one does not rebuild the cluster.
CORE_TOOLS=(etcd helm kubernetes versitygw)

pins_hash() {
  # The pins and the recipe decide what gets built, so they name the cache directory.
  local dir mods=() sums=()
  for dir in "${CORE_TOOLS[@]}"; do mods+=("$TOOLS_DIR/$dir/go.mod"); sums+=("$TOOLS_DIR/$dir/go.sum"); done
  { cat "${mods[@]}" "${sums[@]}"; echo "$RECIPE_VERSION $PROMETHEUS_DEB_VERSION"; } | sha256sum | cut -c1-16
}

checker_stamp() {  # checker_stamp <name>: the hash of its pins, kept next to its binary
  cat "$TOOLS_DIR/$1/go.mod" "$TOOLS_DIR/$1/go.sum" | sha256sum | cut -c1-16
}

CACHE_ROOT="${FINETUNE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/tools}"
BIN_DIR="$CACHE_ROOT/$(pins_hash)/bin"

if [[ "${1:-}" == "--print-bin-dir" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

module_version() {  # module_version <tools subdir> <module path>
  (cd "$TOOLS_DIR/$1" && go list -m -f '{{.Version}}' "$2")
}

timed() {  # timed <label> <command...>
  local label="$1" start end
  shift
  start=$(date +%s)
  echo "==> building $label"
  "$@"
  end=$(date +%s)
  echo "    $label built in $((end - start))s"
}

build_kubernetes() {
  local version minor
  version="$(module_version kubernetes k8s.io/kubernetes)"
  minor="$(echo "$version" | cut -d. -f2)"
  # /version must report the real release: Helm and kubectl check it.
  local ldflags="-s -w"
  ldflags+=" -X k8s.io/component-base/version.gitVersion=$version"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ldflags+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$version"
  (cd "$TOOLS_DIR/kubernetes" && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  (cd "$TOOLS_DIR/etcd" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3)
}

build_helm() {
  local version
  version="$(module_version helm helm.sh/helm/v3)"
  (cd "$TOOLS_DIR/helm" && go build -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
    -o "$BIN_DIR/helm" helm.sh/helm/v3/cmd/helm)
}

build_versitygw() {
  (cd "$TOOLS_DIR/versitygw" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/versitygw" \
    github.com/versity/versitygw/cmd/versitygw)
}

build_checker() {  # build_checker <name> <package>
  (cd "$TOOLS_DIR/$1" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/$1" "$2")
  checker_stamp "$1" > "$BIN_DIR/$1.pins"
}

fetch_deb() {  # fetch_deb <package> <version> <binary...>: Debian's package, unpacked into the cache
  # No root and no system service; only the binaries are kept.
  local package="$1" version="$2" work binary
  shift 2
  work="$(mktemp -d)"
  if ! (cd "$work" && apt-get download "$package=$version" >/dev/null 2>&1); then
    # A fresh machine may have empty package lists: refresh them (needs root), then take any version.
    [[ $(id -u) == 0 ]] && apt-get update -qq >/dev/null
    (cd "$work" && apt-get download "$package" >/dev/null)
  fi
  dpkg-deb -x "$work/${package}"_*.deb "$work/root"
  for binary in "$@"; do cp "$work/root/usr/bin/$binary" "$BIN_DIR/"; done
  rm -rf "$work"
}

# tini is the trainer image's init (its ENTRYPOINT): local pods run under it as they do in the image.
TINI_DEB_VERSION="0.19.0-1+b3"

need() {  # need <binary...>: true when any is missing
  local b
  for b in "$@"; do [[ -x "$BIN_DIR/$b" ]] || return 0; done
  return 1
}

command -v go >/dev/null || { echo "error: go is not on PATH; install Go 1.25+ first" >&2; exit 1; }
mkdir -p "$BIN_DIR"
total_start=$(date +%s)
built=0
if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then timed kubernetes build_kubernetes; built=1; fi
if need etcd; then timed etcd build_etcd; built=1; fi
if need helm; then timed helm build_helm; built=1; fi
if need versitygw; then timed versitygw build_versitygw; built=1; fi
if need prometheus promtool; then
  timed prometheus fetch_deb prometheus "$PROMETHEUS_DEB_VERSION" prometheus promtool
  built=1
fi
if need tini; then timed tini fetch_deb tini "$TINI_DEB_VERSION" tini; built=1; fi
if need kube-score || [[ "$(cat "$BIN_DIR/kube-score.pins" 2>/dev/null)" != "$(checker_stamp kube-score)" ]]; then
  timed kube-score build_checker kube-score github.com/zegl/kube-score/cmd/kube-score
  built=1
fi

if [[ $built == 0 ]]; then
  echo "tools up to date in $BIN_DIR"
else
  echo "tools ready in $BIN_DIR (total $(( $(date +%s) - total_start ))s)"
fi
