#!/usr/bin/env bash
# Make the two base images the Dockerfile builds on, locally, from Debian packages.
#
# No registry is reachable on these machines, so `rust:*-bookworm` and
# `gcr.io/distroless/cc-debian12:nonroot` cannot be pulled. The stand-ins have
# the same contents and are tagged with their own local names (never with the
# real names), which `make image` passes as the BUILDER_IMAGE / RUNTIME_IMAGE
# build args:
#
#   builder: a `debootstrap bookworm` rootfs with gcc + libc6-dev (the linker a
#            Rust build needs) and this machine's Rust toolchain copied in;
#   runtime: what distroless/cc-debian12 is made of (libc6, libgcc-s1, libssl3,
#            ca-certificates, base-files, netbase, tzdata), extracted with
#            dpkg-deb -x, plus passwd/group entries for nonroot (uid/gid 65532).
#
# Each image is built once per machine (skipped when it exists); pass --force
# to rebuild. Needs root, buildah, debootstrap (.ci/run installs them).
set -euo pipefail

BUILDER_IMAGE=${BUILDER_IMAGE:-localhost/echo-service-stand-in/rust:bookworm}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-localhost/echo-service-stand-in/distroless-cc-debian12:nonroot}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=false
[ "${1:-}" = "--force" ] && force=true

for tool in buildah debootstrap dpkg-deb apt-get rustc; do
  command -v "$tool" >/dev/null || { echo "stand-in-bases: $tool missing (apt-get install buildah debootstrap; .ci/run does this)" >&2; exit 1; }
done

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
work=$(mktemp -d /var/tmp/echo-stand-in.XXXXXX)
trap 'rm -rf "$work"' EXIT

# --- runtime: distroless/cc-debian12:nonroot from its Debian packages ----------
if $force || ! exists "$RUNTIME_IMAGE"; then
  echo "stand-in-bases: building $RUNTIME_IMAGE"
  mkdir -p "$work/debs" "$work/runtime"
  pkgs="libc6 libgcc-s1 libssl3 ca-certificates base-files netbase tzdata"
  # A fresh machine may have no package lists yet.
  # shellcheck disable=SC2086
  (cd "$work/debs" && { apt-get download -qq $pkgs 2>/dev/null || { apt-get update -qq && apt-get download -qq $pkgs; }; })
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/runtime"; done
  root="$work/runtime"
  # Like distroless: no docs, man pages or maintainer scripts' leftovers.
  rm -rf "$root"/usr/share/{doc,man,info,lintian,locale} "$root"/usr/sbin "$root"/usr/bin
  # ca-certificates' postinst builds the bundle; use the same Debian bundle from the host.
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  cat > "$root/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
GROUP
  mkdir -p "$root/tmp" "$root/root" "$root/home/nonroot" "$work/home"
  chmod 1777 "$root/tmp"
  rmdir "$root/home/nonroot"
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$root" / >/dev/null
  buildah copy --quiet --chown 65532:65532 "$ctr" "$work/home" /home/nonroot >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/bin:/usr/bin:/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label org.opencontainers.image.description="local stand-in for gcr.io/distroless/cc-debian12:nonroot (Debian bookworm packages)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$RUNTIME_IMAGE" >/dev/null
fi

# --- builder: rust:*-bookworm from debootstrap + this machine's toolchain --------
if $force || ! exists "$BUILDER_IMAGE"; then
  echo "stand-in-bases: building $BUILDER_IMAGE (debootstrap, a few minutes)"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$work/builder" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/builder/var/cache/apt/archives/*.deb "$work"/builder/var/lib/apt/lists/*
  sysroot=$(rustc --print sysroot)
  mkdir -p "$work/builder/usr/local/rust" "$work/builder/usr/local/cargo"
  # The toolchain without its HTML docs.
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$work/builder/usr/local/rust" -xf -
  cp /etc/ssl/certs/ca-certificates.crt "$work/builder/etc/ssl/certs/ca-certificates.crt"
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$work/builder" / >/dev/null
  buildah config --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo --env RUST_VERSION="$(rustc --version | cut -d' ' -f2)" \
    --label org.opencontainers.image.description="local stand-in for rust:bookworm (debootstrap + $(rustc --version))" \
    --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$BUILDER_IMAGE" >/dev/null
fi
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep echo-service-stand-in
