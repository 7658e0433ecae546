#!/usr/bin/env bash
# Idempotent set-up shared by the README's two commands (scripts/run.sh and scripts/test.sh).
# Needs root on a Debian(-like) machine. Installs only what is missing; safe to run again.
#   - Debian packages: BCC (python3-bpfcc), bpftool, iproute2, iptables/nftables, conntrack, pahole, ...
#   - a kernel headers tree at /lib/modules/$(uname -r)/build (Debian's generic headers when the node
#     has none; BCC needs *a* tree to compile, struct offsets come from BTF at run time)
#   - tracefs mounted at /sys/kernel/tracing
#   - a Python venv at .venv that also sees Debian's `bcc` module (--system-site-packages)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NETWATCHD_VENV:-$REPO/.venv}"
log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (BPF, tracefs and network namespaces need it): try 'sudo $0'"
  exit 1
fi

# Run time: BCC (compiles, in a short-lived child), libbpf1 (the daemon's map and attach calls), bpftool,
# iproute2. Tests: the lab's netfilter/conntrack tools, tmux (netwatchctl top),
# prometheus/promtool (alerts, dashboards), podman/runc/debootstrap (the image build), iperf3/tcpdump (bench).
DEB_PACKAGES=(python3 python3-venv python3-pip python3-bpfcc libbpf1 bpftool iproute2 iptables nftables conntrack
  pahole tmux procps ca-certificates openssl util-linux prometheus podman runc debootstrap iperf3 tcpdump
  gcc libc6-dev)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

command -v npm >/dev/null || missing+=(npm)  # helm and Grafana's schema come from the npm registry

KREL="$(uname -r)"
KBUILD="/lib/modules/$KREL/build"
if [[ ! -e "$KBUILD/include" ]]; then
  # Prefer the exact headers; otherwise Debian's generic ones (wrong struct layouts, but BCC only
  # needs them to compile: every struct read goes through offsets resolved from BTF).
  if ! apt-cache policy "linux-headers-$KREL" 2>/dev/null | grep -q Candidate:.*[0-9]; then
    missing+=(linux-headers-amd64)
  else
    missing+=("linux-headers-$KREL")
  fi
fi

if (( ${#missing[@]} )); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts prometheus as a service where systemd runs; the tests start their own on 127.0.0.1
  (systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true)
fi

if [[ ! -e "$KBUILD/include" ]]; then
  generic="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)"
  if [[ -z "$generic" || -z "$common" ]]; then
    log "no kernel headers tree found under /usr/src after installing linux-headers-amd64"
    exit 1
  fi
  log "linking generic headers $generic as $KBUILD (offsets come from BTF)"
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$generic" "$KBUILD"
  ln -sfn "$common" "/lib/modules/$KREL/source"
fi

if [[ ! -e /sys/kernel/tracing/events ]]; then
  log "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing || { log "cannot mount tracefs"; exit 1; }
fi
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "bpffs not mountable (only needed for pinning)"
fi

# Debian's python3 so that --system-site-packages sees the `bcc` module from python3-bpfcc.
PY=/usr/bin/python3
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  log "creating Python environment $VENV"
  rm -rf "$VENV"
  "$PY" -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.netwatchd-installed"
if [[ ! -f "$stamp" || "$REPO/pyproject.toml" -nt "$stamp" ]]; then
  log "installing netwatchd and its Python dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$REPO[test]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  "$VENV/bin/python" -c 'import netwatchd, bcc, pytest' || { log "Python environment is incomplete"; exit 1; }
  touch "$stamp"
fi
log "ready: $VENV"
