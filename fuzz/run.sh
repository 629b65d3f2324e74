#!/usr/bin/env bash
# Fuzzes the PROXY-protocol and HTTP-peek parsers (sticky_dispatch::keysource) with
# cargo fuzz, FUZZ_SECONDS (default 60) per target. Needs the nightly toolchain; installs
# cargo-fuzz when missing. New inputs go to fuzz/corpus/ (not committed); the committed
# seeds are in fuzz/seeds/. A crash leaves its input in fuzz/artifacts/<target>/ and
# exits non-zero: turn it into a test in src/keysource.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p fuzz/target
for target in proxy_header http_key; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    log="fuzz/target/$target.log"
    if ! cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz $target failed: see $log and fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log"
done
