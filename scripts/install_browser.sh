#!/usr/bin/env bash
# Debian's Chromium for the explorer's browser test (tests/test_explorer.py drives it with playwright,
# a test extra). Nothing to do where it is already installed; without root (or sudo) it says so and the
# test is skipped, except under CI, where the test fails.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then run=(); elif sudo -n true 2>/dev/null; then run=(sudo -n); else
  echo "install_browser: no root; install Debian's chromium package for the explorer's browser test" >&2; exit 0
fi
echo "install_browser: apt-get install chromium (once)"
"${run[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq chromium >/dev/null \
  || echo "install_browser: apt-get install chromium failed; the explorer's browser test cannot run" >&2
