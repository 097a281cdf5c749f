#!/usr/bin/env bash
# Shows the loom models bite: copies the committed repository to a scratch
# directory, applies each mutant of mutate.py there in turn, builds the models
# once per mutant and runs every model in its own process (a loom deadlock
# aborts the whole test binary), then prints which models caught it.
#   usage: loom-tests/mutants/run.sh [MUTANT...]      (default: all)
# Scratch dir: $LOOM_MUTANT_DIR (default /tmp/ctxstore-loom-mutant). The
# checkout itself is never modified. LOOM_MUTANT_MODELS=checkout takes the
# models (loom-tests/tests) from the checkout instead of HEAD, to see a new
# model bite before committing it; the engine is always HEAD's.
# LOOM_MUTANT_ASAN=1 builds the models under AddressSanitizer (nightly flags
# through RUSTC_BOOTSTRAP, as CI's ASan step): loom does not model freeing,
# so a mutant that leaves a dangling waiter pointer (W, Y) fails the plain
# run only through undefined behaviour; under ASan it is a use-after-free
# report. The first ASan build takes a few minutes.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${LOOM_MUTANT_DIR:-/tmp/ctxstore-loom-mutant}"
mkdir -p "$work"
rm -rf "$work/src" "$work/loom-tests/tests"
git -C "$repo" archive HEAD | tar -x -C "$work"
if [ "${LOOM_MUTANT_MODELS:-}" = checkout ]; then
  cp -r "$repo/loom-tests/tests/." "$work/loom-tests/tests/"
fi
touch "$work/.loom-mutant"
# Only the library and loom-tests are built here: drop declared bench/example
# targets whose files are not committed, so the manifest still parses.
python3 - "$work/Cargo.toml" <<'PY'
import os, re, sys
path = sys.argv[1]; root = os.path.dirname(path)
dirs = {"bench": "benches", "example": "examples", "test": "tests"}
blocks = re.split(r"(?m)^(?=\[)", open(path).read())
def keep(b):
    m = re.match(r"\[\[(bench|example|test)\]\]", b)
    if not m: return True
    name = re.search(r'(?m)^name\s*=\s*"([^"]+)"', b).group(1)
    d = dirs[m.group(1)]
    return any(os.path.exists(os.path.join(root, d, f)) for f in (name + ".rs", name + "/main.rs"))
open(path, "w").write("".join(b for b in blocks if keep(b)))
PY
rm -rf "$work/.pristine-src"
cp -r "$work/src" "$work/.pristine-src"
logs="$work/logs"; mkdir -p "$logs"
cd "$work"
flags="--cfg ctxstore_loom"; target=(); deps=loom-tests/target/release/deps
if [ "${LOOM_MUTANT_ASAN:-}" = 1 ]; then
  export RUSTC_BOOTSTRAP=1 ASAN_OPTIONS=detect_leaks=0
  flags="$flags -Zsanitizer=address"
  target=(--target x86_64-unknown-linux-gnu)
  deps=loom-tests/target/x86_64-unknown-linux-gnu/release/deps
fi
for m in ${@:-$(python3 "$here/mutate.py" list)}; do
  rm -rf src && cp -r .pristine-src src
  python3 "$here/mutate.py" "$m" || { echo "== $m: could not apply"; continue; }
  if ! (cd loom-tests && RUSTFLAGS="$flags" cargo build -q --release --tests "${target[@]}") >"$logs/$m.build" 2>&1; then
    echo "== $m: build failed (see $logs/$m.build)"; continue
  fi
  bin=$(ls -t "$deps"/slot_protocol-* | grep -v '\.d$' | head -1)
  echo "== $m"
  for t in $("$bin" --list 2>/dev/null | sed -n 's/: test$//p'); do
    LOOM_MAX_PREEMPTIONS=2 timeout 600 "$bin" --exact "$t" >"$logs/$m.$t.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
      echo "   pass    $t"
    else
      why=$(grep -m1 -oE "AddressSanitizer: [a-z-]+" "$logs/$m.$t.log")
      [ -n "$why" ] || why=$(grep -m1 -A1 "panicked at" "$logs/$m.$t.log" | tail -1 | cut -c1-80)
      [ "$rc" -eq 124 ] && why="timed out after 600 s"
      echo "   CAUGHT  $t: ${why:-exit status $rc}"
    fi
  done
done
rm -rf src && cp -r .pristine-src src
