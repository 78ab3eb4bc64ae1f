#!/usr/bin/env bash
# The VM packaging, end to end, as root on Debian (CI runs it from deploy/check.sh):
#
#   - builds the .deb (deploy/debian/build-deb.sh: release build, man pages, completions,
#     cargo deb) and installs it with `dpkg -i`;
#   - the installed /usr/bin/wskeep passes `check` on the installed /etc/wskeep/wskeep.toml, as
#     root and as the wskeep user the package created; that file is a conffile and an edit of it
#     survives a reinstall;
#   - the installed unit passes `systemd-analyze verify` (no warning allowed) and keeps
#     `systemd-analyze security` exposure at 2.0 or below, and its timings and limits agree with
#     the installed configuration (deploycheck.py unit);
#   - the man pages render and the bash completion completes subcommands;
#   - the installed binary runs as the wskeep user with the installed configuration (on port 0
#     of 127.0.0.1), answers /readyz, and exits 0 on SIGTERM;
#   - the package is purged again at the end, unless it was installed before this script ran.
#
# Exits non-zero on the first failing step, saying what failed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
start=$SECONDS

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || fail "deploy/vm-check.sh installs a package: run it as root"
command -v dpkg >/dev/null || fail "dpkg is missing: deploy/vm-check.sh needs Debian"
if ! command -v systemd-analyze >/dev/null; then
  step "installing systemd (for systemd-analyze; no service is started)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >/dev/null
fi

was_installed=
dpkg-query -W -f='${Status}' wskeep 2>/dev/null | grep -q 'install ok installed' && was_installed=1

step "build the .deb (deploy/debian/build-deb.sh)"
deb=$(bash deploy/debian/build-deb.sh | tail -n 1)
[[ -f $deb ]] || fail "build-deb.sh did not produce a .deb (got: $deb)"
echo "$deb ($(du -h "$deb" | cut -f1))"

step "dpkg -i $deb"
dpkg -i "$deb" >/dev/null || fail "dpkg -i failed"
version=$(dpkg-deb -f "$deb" Version)
/usr/bin/wskeep --version | grep -qF "wskeep ${version%-*}" || fail "/usr/bin/wskeep --version is not ${version%-*}"
getent passwd wskeep | grep -q ':/usr/sbin/nologin$' || fail "no system user wskeep with a nologin shell"
[[ $(stat -c '%U:%G %a' /etc/wskeep/tls) == "root:wskeep 750" ]] || fail "/etc/wskeep/tls must be root:wskeep 0750"
dpkg-query -W -f='${Conffiles}\n' wskeep | grep -q '^ /etc/wskeep/wskeep.toml ' \
  || fail "/etc/wskeep/wskeep.toml is not a conffile"

step "/usr/bin/wskeep check --config /etc/wskeep/wskeep.toml (as root and as wskeep)"
/usr/bin/wskeep check --config /etc/wskeep/wskeep.toml > "$tmp/effective.toml" 2> "$tmp/check.err" \
  || { cat "$tmp/check.err" >&2; fail "the installed configuration does not pass wskeep check"; }
runuser -u wskeep -- /usr/bin/wskeep check --config /etc/wskeep/wskeep.toml >/dev/null 2>&1 \
  || fail "the wskeep user cannot load /etc/wskeep/wskeep.toml"

step "systemd-analyze verify, security and the unit's settings"
unit=$(dpkg -L wskeep | grep '/systemd/system/wskeep.service$') || fail "the package installs no wskeep.service"
systemd-analyze verify "$unit" > "$tmp/verify.out" 2>&1 || { cat "$tmp/verify.out" >&2; fail "systemd-analyze verify $unit"; }
# verify reports unknown or misspelt directives as warnings with exit 0: any output is a failure.
[[ ! -s $tmp/verify.out ]] || { cat "$tmp/verify.out" >&2; fail "systemd-analyze verify warns about $unit"; }
systemd-analyze security --offline=yes --threshold=20 "$unit" > "$tmp/security.out" 2>&1 \
  || { tail -n 25 "$tmp/security.out" >&2; fail "$unit: exposure above 2.0 (systemd-analyze security)"; }
tail -n 1 "$tmp/security.out"
"$PYTHON" deploy/tools/deploycheck.py unit "$unit" "$tmp/effective.toml"

step "man pages and completions"
for page in wskeep wskeep-run wskeep-check wskeep-probe wskeep-bench; do
  [[ -f /usr/share/man/man1/$page.1.gz ]] || fail "no man page $page(1)"
done
zcat /usr/share/man/man1/wskeep.1.gz | grep -q '^\.SH FILES' || fail "wskeep(1) has no FILES section"
if command -v man >/dev/null; then
  MANWIDTH=100 man -l /usr/share/man/man1/wskeep.1.gz 2>"$tmp/man.err" | grep -q 'wskeep-check(1)' \
    || { cat "$tmp/man.err" >&2; fail "wskeep(1) does not render with man"; }
  [[ ! -s $tmp/man.err ]] || { cat "$tmp/man.err" >&2; fail "man warns about wskeep(1)"; }
fi
for f in /usr/share/bash-completion/completions/wskeep /usr/share/zsh/vendor-completions/_wskeep \
         /usr/share/fish/vendor_completions.d/wskeep.fish; do
  grep -q 'probe' "$f" || fail "$f is missing or does not complete the probe subcommand"
done
completed=$(bash -c 'source /usr/share/bash-completion/completions/wskeep
  COMP_WORDS=(wskeep ch); COMP_CWORD=1; _wskeep wskeep ch wskeep; printf "%s\n" "${COMPREPLY[@]}"')
[[ $completed == check ]] || fail "bash completion of 'wskeep ch' gave '$completed', not 'check'"

step "the installed wskeep runs as the wskeep user and drains on SIGTERM"
# setpriv execs (no child in between), so $! is wskeep itself. The log exists before it starts:
# the loop below may look before the child has opened it.
: > "$tmp/run.log"
WSKEEP_LISTEN__ADDR=127.0.0.1:0 WSKEEP_ADMIN__ADDR=127.0.0.1:0 \
  setpriv --reuid=wskeep --regid=wskeep --init-groups --no-new-privs \
  /usr/bin/wskeep run --config /etc/wskeep/wskeep.toml 2> "$tmp/run.log" &
server_pid=$!
admin=
for _ in $(seq 100); do
  admin=$({ grep '"message":"bound"' "$tmp/run.log" || true; } | sed -n 's/.*"admin":"\([0-9.:]*\)".*/\1/p' | head -n 1)
  [[ -n $admin ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/run.log" >&2; fail "wskeep exited at start"; }
  sleep 0.1
done
[[ -n $admin ]] || { cat "$tmp/run.log" >&2; fail "wskeep did not log its bound addresses within 10 s"; }
"$PYTHON" - "$admin" <<'EOF' || fail "the installed wskeep does not answer on its admin port"
import sys, urllib.request
base = f"http://{sys.argv[1]}"
assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
assert b"wskeep_build_info" in urllib.request.urlopen(base + "/metrics", timeout=5).read()
EOF
kill -TERM "$server_pid"
status=0
timeout 10 tail --pid="$server_pid" -f /dev/null || fail "wskeep did not exit within 10 s of SIGTERM"
wait "$server_pid" || status=$?
server_pid=
((status == 0)) || { cat "$tmp/run.log" >&2; fail "wskeep exited $status after SIGTERM, not 0"; }

step "an edited conffile survives a reinstall"
echo "# edited by deploy/vm-check.sh" >> /etc/wskeep/wskeep.toml
dpkg -i --force-confold "$deb" >/dev/null
grep -q 'edited by deploy/vm-check.sh' /etc/wskeep/wskeep.toml || fail "dpkg replaced the edited /etc/wskeep/wskeep.toml"
sed -i '/edited by deploy\/vm-check.sh/d' /etc/wskeep/wskeep.toml

if [[ -z $was_installed ]]; then
  step "dpkg --purge wskeep (it was not installed before)"
  dpkg --purge wskeep >/dev/null
  [[ ! -e /usr/bin/wskeep && ! -e /etc/wskeep ]] || fail "dpkg --purge left /usr/bin/wskeep or /etc/wskeep behind"
else
  step "leaving wskeep $version installed (it was installed before)"
fi

printf 'deploy/vm-check.sh: all checks passed in %ss\n' "$((SECONDS - start))"
