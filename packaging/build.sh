#!/usr/bin/env bash
# Builds the release artifacts from this tree into target/packages/:
#   sticky-dispatch_<version>-1_<arch>.deb         (cargo-deb)
#   sticky-dispatch-<version>-1.<arch>.rpm         (cargo-generate-rpm)
#   sticky-dispatch-<version>.tgz                  (npm pack of node/)
#   sticky_dispatch-<version>-py3-none-any.whl     (python -m build of python/: wheel
#   sticky_dispatch-<version>.tar.gz                and sdist, with flit_core)
# with one release build shared by the .deb and the .rpm. What goes into them is in
# Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]),
# node/package.json and python/pyproject.toml; see packaging/README.md.
#
# usage: packaging/build.sh
# Installs cargo-deb and cargo-generate-rpm (cargo install --locked) when missing, and
# the Python build tools into <target>/packaging-venv (pip, pinned versions).
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

# The npm package: exactly what `npm publish` would upload ("files" in package.json);
# npm pack writes only the tarball, with fixed file times.
echo "== npm pack node/"
(cd node && npm pack --silent --pack-destination "$out" >/dev/null)

# The Python wheel and sdist, with the pinned build tools in a venv of their own (not
# the user's python, not the test venv) and without build isolation, so that the same
# flit_core builds every time and nothing is downloaded per build. python -m build makes
# the sdist, then the wheel from the unpacked sdist: a broken sdist fails here.
echo "== python -m build python/ (wheel, sdist)"
pyvenv=$target/packaging-venv
pytools="build==1.6.1 flit_core==3.12.0"
if [ "$(cat "$pyvenv/installed" 2>/dev/null)" != "$pytools" ]; then
    rm -rf "$pyvenv"
    python3 -m venv "$pyvenv" ||
        { echo "build.sh: python3 -m venv failed (Debian: apt install python3-venv)" >&2; exit 1; }
    # shellcheck disable=SC2086 # two requirements
    "$pyvenv/bin/pip" install -q --disable-pip-version-check $pytools
    echo "$pytools" >"$pyvenv/installed"
fi
# flit_core builds from the sources alone; a backend that left build/, dist/ or
# *.egg-info behind (setuptools did) is caught here. (Only those names: tools run in
# python/ leave caches of their own.)
junk() { ls -A python | grep -E '^(build|dist|.*\.egg-info)$' || true; }
before=$(junk)
"$pyvenv/bin/python" -m build --no-isolation --outdir "$out" python >/dev/null
after=$(junk)
if [ "$before" != "$after" ]; then
    echo "build.sh: building the Python package wrote into python/:" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
fi

# flit_core writes the wheel through a private temporary file (0600).
chmod 644 "$out"/*

echo "== built:"
ls -l "$out"
