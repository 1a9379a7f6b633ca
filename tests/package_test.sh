#!/usr/bin/env bash
# The embeddable library as other projects use it: `cmake --install` of BUILD_DIR into a
# temp prefix, then tests/package/ built against it with find_package(sluice), and again
# with add_subdirectory of the source tree (which must build sluice::core alone); each
# build's program (examples/embed.cc) must run and pass.
# Usage: tests/package_test.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
test -f "$work/prefix/include/sluice/memory_store.h"
test -f "$work/prefix/lib/cmake/sluice/sluiceConfig.cmake"

for mode in installed subdirectory; do
  if [ "$mode" = installed ]; then
    args=(-DCMAKE_PREFIX_PATH="$work/prefix")
  else
    args=(-DSLUICE_SOURCE_DIR="$root")
  fi
  # A Release build without link-time optimization: the installed archive must link into
  # a program that does not use it.
  if ! cmake -S "$root/tests/package" -B "$work/$mode" -G Ninja -DCMAKE_BUILD_TYPE=Release \
       -DEMBED_SOURCE="$root/examples/embed.cc" "${args[@]}" > "$work/$mode.log" 2>&1 ||
     ! cmake --build "$work/$mode" -j2 >> "$work/$mode.log" 2>&1; then
    cat "$work/$mode.log"
    echo "package_test: the $mode build failed" >&2
    exit 1
  fi
  "$work/$mode/embed"
  echo "package_test: $mode: ok"
done
