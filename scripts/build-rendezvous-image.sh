#!/usr/bin/env bash
# Builds the rendezvous's container image (rendezvous/Containerfile) with
# docker or podman, whichever is here and running. Usage:
#   scripts/build-rendezvous-image.sh [TAG]      (default tag: natter-rendezvous)
# Exits 0 without building, and says why, when no container tool can build
# here (none installed, or its daemon is not running): CI calls it so.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-natter-rendezvous}
for tool in docker podman; do
    if command -v "$tool" >/dev/null 2>&1 && "$tool" info >/dev/null 2>&1; then
        echo "building $tag with $tool"
        exec "$tool" build -f rendezvous/Containerfile -t "$tag" .
    fi
done
echo "no container tool can build here (docker or podman, installed and running): image not built" >&2
