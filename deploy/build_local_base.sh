#!/usr/bin/env bash
# Builds a local Debian bookworm base image (python3 + venv) to build marserve's images against, for a
# machine that reaches Debian's mirror and PyPI but no container registry (ours). Elsewhere, skip this:
# the Dockerfiles default to the public python slim image.
#
#   sudo deploy/build_local_base.sh [TAG]          # default tag: marserve-base:bookworm
#   docker build --build-arg BASE_IMAGE=marserve-base:bookworm -f deploy/Dockerfile.cpu ...
#
# Needs root (debootstrap, chroot), debootstrap and a docker daemon (DOCKER_HOST is honoured).
# DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian). The host's extra CA
# certificates (/usr/local/share/ca-certificates) are trusted in the image too.
set -euo pipefail
tag=${1:-marserve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "build_local_base.sh: $tool not found (apt-get install ${tool/docker/docker.io})" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "build_local_base.sh: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase + what the python slim image has that marserve needs: python3, venv (ensurepip), CA certificates.
echo "build_local_base.sh: debootstrap bookworm into $root (a few minutes)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
# mktemp -d made the root mode 700; as the image's / that would leave a non-root user unable to find
# anything in it (`exec: sh: not found`).
chmod 755 "$root"
# This host's own CA certificates (a machine behind a TLS-inspecting proxy reaches PyPI only through them),
# trusted in the image too; PIP_CERT below points pip at the system bundle, as pip does not read it itself.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root"/usr/local/share/ca-certificates/
  chroot "$root" update-ca-certificates >/dev/null
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
# The image carries no ENV of its own once imported; give it the slim image's basics.
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "build_local_base.sh: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
