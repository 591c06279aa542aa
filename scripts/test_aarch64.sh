#!/usr/bin/env bash
# The core crate's lib tests built for aarch64 and run under qemu-user: the NEON kernels against
# their scalar references, first on qemu's default CPU (it has dotprod: the SDOT kernels), then
# the kernel tests on a Cortex-A53 model (no dotprod: the widening-multiply kernels).
# Installs the cross toolchain where it can (rustup target; apt-get as root). Where it cannot, it
# prints one line "aarch64 NEON tests NOT RUN: <reason>" and exits 0; failing tests exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

not_run() {
    echo "aarch64 NEON tests NOT RUN: $*"
    exit 0
}

command -v rustup >/dev/null 2>&1 || not_run "rustup is not installed (needed to add the $TARGET std)"
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET" >/dev/null 2>&1 ||
        not_run "'rustup target add $TARGET' failed (no network to the rustup server?)"
fi

have_cross() {
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 &&
        command -v qemu-aarch64 >/dev/null 2>&1 &&
        [ -e "$SYSROOT/lib/libc.so.6" ]
}
if ! have_cross; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
        # the package lists may be missing or stale: update once if the first attempt fails
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1; } ||
            not_run "apt-get could not install ${pkgs[*]}"
    else
        not_run "aarch64-linux-gnu-gcc, qemu-aarch64 or $SYSROOT missing, and no apt-get as root"
    fi
    have_cross || not_run "the cross toolchain is still incomplete after apt-get install"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
cargo test -p pyqmoe-core --target "$TARGET" --lib
QEMU_CPU=cortex-a53 cargo test -p pyqmoe-core --target "$TARGET" --lib vec_dot
echo "aarch64 NEON tests passed (SDOT and widening-multiply kernels)"
