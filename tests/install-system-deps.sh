#!/bin/sh
# The system packages the test suite needs, installed when missing (Debian, Ubuntu):
# - bubblewrap: the sandbox isolation `miren serve` uses by default;
# - curl: a real client in the framework and upload tests;
# - gunicorn, python3-flask, python3-starlette, python3-uvicorn, python3-wsproto: the real
#   frameworks the sandboxes run. A confined sandbox sees /usr, not a pyenv under /root, so
#   these are the system python's packages (the test process's own come from pip);
# - pebble (with pebble-challtestsrv): a real ACME server for the on-demand certificate tests;
# - chromium: a real browser logs in to a protected preview (tests/e2e/test_browser.py).
set -eu
packages="bubblewrap curl gunicorn python3-flask python3-starlette python3-uvicorn python3-wsproto pebble chromium"
missing=""
for p in $packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends $missing
