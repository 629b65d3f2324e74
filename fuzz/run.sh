#!/usr/bin/env bash
# Fuzzes the PROXY-protocol and HTTP-peek parsers (sticky_dispatch::keysource) with
# cargo fuzz (libFuzzer), FUZZ_SECONDS (default 60) per target; installs cargo-fuzz when
# missing. With a nightly toolchain it fuzzes under AddressSanitizer (cargo fuzz's
# default); without one, on stable with `-s none` (the parsers are safe Rust: a panic is
# what there is to find, and libFuzzer catches it either way). New inputs go to
# fuzz/corpus/ (not committed); the committed seeds are in fuzz/seeds/. A failure leaves
# its input in fuzz/artifacts/<target>/ and exits non-zero: turn it into a test in
# src/keysource.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz run)
else
    echo "no nightly toolchain: fuzzing on stable, without AddressSanitizer"
    fuzz=(cargo fuzz run -s none)
fi
mkdir -p fuzz/target
for target in proxy_header http_key; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    log="fuzz/target/$target.log"
    if ! "${fuzz[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz $target failed: see $log and fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log"
done
