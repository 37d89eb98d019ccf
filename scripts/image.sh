#!/bin/sh
# Builds the wiregate image (deploy/Containerfile) without a container registry:
#
#   1. a Debian 12 minbase root from Debian's mirror (debootstrap), cached as a tarball
#      in $WIREGATE_IMAGE_CACHE (default /var/cache/wiregate-image) and reused for
#      $WIREGATE_IMAGE_BASE_DAYS days (default 7);
#   2. imported as localhost/debian:bookworm-min (again only when the tarball changed);
#   3. `buildah bud` with BASE=localhost/debian:bookworm-min, tagged
#      localhost/wiregate:<version from pyproject.toml> (and :dev), layers cached.
#
# Prints the image's name and size. Idempotent: a second run reuses the base and every
# unchanged layer. Needs root; installs buildah, podman and debootstrap when missing.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "image: run as root (debootstrap and buildah's chroot isolation need it)" >&2
    exit 1
fi

PACKAGES="buildah podman debootstrap"
missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "image: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

CACHE=${WIREGATE_IMAGE_CACHE:-/var/cache/wiregate-image}
MAX_DAYS=${WIREGATE_IMAGE_BASE_DAYS:-7}
BASE_TAR="$CACHE/bookworm-min.tar"
BASE_IMAGE=localhost/debian:bookworm-min
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=${WIREGATE_IMAGE:-localhost/wiregate:$VERSION}
mkdir -p "$CACHE"

# -- 1. the base root filesystem
if [ -f "$BASE_TAR" ] && [ -z "$(find "$BASE_TAR" -mtime +"$MAX_DAYS")" ]; then
    echo "image: reusing $BASE_TAR"
else
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "image: debootstrap --variant=minbase bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
        tail -n 30 "$CACHE/debootstrap.log" >&2
        exit 1
    }
    # The image's apt uses the same mirrors (with security updates); no package lists
    # or caches are kept.
    SECURITY=$(awk '/^URIs:.*debian-security/{print $2; exit}' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$MIRROR" "$MIRROR" "$SECURITY" >"$rootfs/etc/apt/sources.list"
    # Like debian:bookworm-slim: no documentation, manuals or translations (but the
    # copyright files), and no package files kept after an install.
    printf '%s\n' \
        'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
        'path-exclude /usr/share/lintian/*' >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
    printf '%s\n' 'Binary::apt::APT::Keep-Downloaded-Packages "false";' \
        >"$rootfs/etc/apt/apt.conf.d/slim"
    find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/lintian/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
        -exec rm -rf {} +
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$rootfs"
    trap - EXIT
fi

# -- 2. the local base image, imported again only when the tarball changed
sum=$(sha256sum "$BASE_TAR" | cut -d' ' -f1)
if [ "$(cat "$CACHE/imported.sha256" 2>/dev/null || true)" = "$sum" ] \
    && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "image: $BASE_IMAGE is up to date"
else
    podman import "$BASE_TAR" "$BASE_IMAGE" >/dev/null
    echo "$sum" >"$CACHE/imported.sha256"
    echo "image: imported $BASE_IMAGE"
fi

# -- 3. the wiregate image
echo "image: building $IMAGE"
# pip inside the build trusts what this host trusts (a TLS-intercepting proxy's CA).
CA=${WIREGATE_IMAGE_CA:-/etc/ssl/certs/ca-certificates.crt}
set -- --build-arg BASE="$BASE_IMAGE"
if [ -s "$CA" ]; then
    set -- "$@" --secret id=pip-ca,src="$CA"
fi
buildah bud --isolation chroot --layers "$@" \
    -f deploy/Containerfile -t "$IMAGE" -t localhost/wiregate:dev .
size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)
echo "image: $IMAGE $size"
