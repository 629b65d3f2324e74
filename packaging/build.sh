#!/usr/bin/env bash
# Builds the distribution packages from this tree into target/packages/:
#   sticky-dispatch_<version>-1_<arch>.deb   (cargo-deb)
#   sticky-dispatch-<version>-1.<arch>.rpm   (cargo-generate-rpm)
# with one release build shared by both. What goes into them is in Cargo.toml,
# [package.metadata.deb] and [package.metadata.generate-rpm]; see packaging/README.md.
#
# usage: packaging/build.sh
# Installs cargo-deb and cargo-generate-rpm (cargo install --locked) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The target directory, wherever CARGO_TARGET_DIR or a cargo config puts it.
target=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || { echo "build.sh: cannot find cargo's target directory" >&2; exit 1; }
out=$target/packages

# The versions this packaging is tested with; a newer one already installed is used as is.
for tool in deb@3.8.0 generate-rpm@0.21.1; do
    if ! cargo "${tool%@*}" --version >/dev/null 2>&1; then
        echo "== cargo install --locked cargo-$tool"
        cargo install --locked "cargo-$tool"
    fi
done

# The only release build. Symbols stripped here rather than by each packager, so the
# .deb and the .rpm ship the same binaries (cargo-generate-rpm does not strip).
echo "== cargo build --release (all binaries)"
CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bins

# Man pages from the CLI and config definitions; under target/release/ because both
# packagers map that prefix to the real target directory.
echo "== man pages"
man=$target/release/man
rm -rf "$man"
"$target/release/sticky-dispatch" manual "$man" >/dev/null
gzip -9n "$man"/sticky-dispatch.8 "$man"/sticky-dispatch.toml.5

# cargo-generate-rpm takes a script path that does not exist as the script text itself:
# refuse to package that.
for script in packaging/rpm/post.sh packaging/rpm/preun.sh packaging/rpm/postun.sh \
    packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm; do
    [ -f "$script" ] || { echo "build.sh: $script is missing" >&2; exit 1; }
    sh -n "$script"
done

# Reproducible: file times and the rpm's build date from the last commit.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)
    export SOURCE_DATE_EPOCH
fi

rm -rf "$out"
mkdir -p "$out"
echo "== cargo deb"
cargo deb --no-build --locked --output "$out/"
echo "== cargo generate-rpm"
cargo generate-rpm --output "$out/"

echo "== built:"
ls -l "$out"
