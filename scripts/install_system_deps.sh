#!/usr/bin/env bash
# System packages used by the Deep Reveal tests, installed when missing (Debian/Ubuntu, apt-get):
#   postgresql  the server, load and fault tests on PostgreSQL start a throw-away cluster with its initdb
#   chromium    the real-browser test (Playwright drives Debian's chromium, no browser download)
#   nginx       the deployment test runs deploy/nginx-deep-reveal.conf in front of the study server
# Needs root (or password-less sudo). When a package cannot be installed this script says so and exits 0:
# the tests that need it skip with a message and everything else still runs.
set -uo pipefail

need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -eq 0 ]; then
  echo "system packages: postgresql, chromium and nginx present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages: no apt-get; install ${need[*]} yourself (the tests that need them skip)"
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "system packages: not root and no password-less sudo; install ${need[*]} yourself (the tests that need them skip)"
    exit 0
  fi
fi
echo "system packages: installing ${need[*]}"
if ! { "${sudo[@]}" apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"; }; then
  echo "system packages: could not install ${need[*]}; the tests that need them will skip"
fi
exit 0
