#!/usr/bin/env bash
# Install pbx-bridge as a systemd service: its user, the unit, a generated ops API token; then print
# the next steps. Run as root from a checkout, after `pip install` into PREFIX (README "Running it for real").
#
#   scripts/install-service.sh [--prefix /opt/pbx-bridge] [--root DIR]
#
# --prefix: where pbx-bridge is installed (ExecStart=PREFIX/bin/pbx-bridge); --root: install into an
# image or a container's root filesystem instead of this machine (nothing is started). Idempotent:
# an existing configuration or secret is never overwritten.
set -euo pipefail

prefix=/opt/pbx-bridge
root=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-service.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install-service.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "install-service.sh: run it as root" >&2; exit 1; }
etc="$root/etc/pbx-bridge"
unit="$root/etc/systemd/system/pbx-bridge.service"

# 1. The service user, from systemd/pbx-bridge.sysusers (useradd where systemd-sysusers is missing).
install -D -m 0644 "$here/systemd/pbx-bridge.sysusers" "$root/etc/sysusers.d/pbx-bridge.conf"
if command -v systemd-sysusers >/dev/null; then
  systemd-sysusers ${root:+--root="$root"} "$root/etc/sysusers.d/pbx-bridge.conf"
elif ! grep -q '^pbx-bridge:' "$root/etc/passwd"; then
  useradd ${root:+--root "$root"} --system --user-group --home-dir /var/lib/pbx-bridge --no-create-home \
    --shell /usr/sbin/nologin pbx-bridge
fi

# 2. The unit, its ExecStart pointing at PREFIX.
install -d -m 0755 "$(dirname "$unit")"
sed "s#/opt/pbx-bridge/bin/pbx-bridge#$prefix/bin/pbx-bridge#" "$here/systemd/pbx-bridge.service" > "$unit.tmp"
chmod 0644 "$unit.tmp" && mv "$unit.tmp" "$unit"

# 3. The secrets' place: root only; the service reads them as credentials (LoadCredential=).
install -d -m 0755 "$etc"
if [ ! -e "$etc/api-ops.token" ]; then
  (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$etc/api-ops.token")
  echo "generated the ops API token in $etc/api-ops.token"
fi
chmod 0600 "$etc/api-ops.token"

if [ -z "$root" ] && [ -x "$prefix/bin/pbx-bridge" ] && command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$unit"
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

missing=()
[ -x "$prefix/bin/pbx-bridge" ] || missing+=("install pbx-bridge: python3 -m venv $prefix && $prefix/bin/pip install $here")
[ -e "$etc/ami.secret" ] || missing+=("write the AMI secret: (umask 077; printf '%s\\n' 'THE-SECRET' > $etc/ami.secret)")
[ -e "$etc/pbx-bridge.toml" ] || missing+=("write $etc/pbx-bridge.toml (README), with secret_file = \"ami.secret\" and token_file = \"api-ops.token\"")
cat <<EOF
installed: $unit, user pbx-bridge, $root/etc/sysusers.d/pbx-bridge.conf
next steps:
EOF
for step in "${missing[@]}"; do echo "  - $step"; done
cat <<EOF
  - check it: $prefix/bin/pbx-bridge check-config && $prefix/bin/pbx-bridge migrate (as the database owner)
  - start it: systemctl enable --now pbx-bridge   (returns once it is READY: first AMI login done)
  - watch it: systemctl status pbx-bridge; journalctl -u pbx-bridge -f
EOF
