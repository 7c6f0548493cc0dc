#!/bin/sh
# build-progress.sh OUT PKG: go build PKG into OUT, showing what happens on
# a first run (make run): the modules downloaded, then the packages
# compiled, each as a counter on one line (a warm build: only the few it relinks).
# Errors are printed as go prints them, and the exit status is go's.
set -eu
GO=${GO:-go}
out=$1 pkg=$2
$GO mod download -x 2>&1 | awk '/^# get .*\.zip: 200/ { n++; printf "\r  %d modules downloaded", n } END { if (n) print "" }'
total=$($GO list -deps "$pkg" | wc -l)
{ $GO build -v -o "$out" "$pkg" 2>&1 && echo "exit 0" || echo "exit $?"; } | awk -v total="$total" '
  /^exit [0-9]+$/ { code = $2; next }
  /^[A-Za-z0-9._~\/-]+$/ { n++; printf "\r  %d of %d packages compiled", n, total; next }
  { if (n && !nl) { print ""; nl = 1 } print }
  END { if (n && !nl) print ""; exit code }'
