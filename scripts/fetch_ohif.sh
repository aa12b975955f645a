#!/usr/bin/env bash
# The prebuilt OHIF Viewer v3 that the viewer test serves, from the npm registry, into the
# git-ignored cache/ohif/. The version is pinned: OHIF's button texts and data-cy selectors,
# which the test reads, change between versions. ort/ (ONNX runtime, ~140 MB) and
# dicom-microscopy-viewer/ are left out: the test uses neither.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.13.2
SHASUM=26a51ffcc1704c30fff403258a1d7392e9a991f3  # npm's dist.shasum of @ohif/app@3.13.2
TARGET=cache/ohif/$VERSION

if [ -f "$TARGET/dist/index.html" ]; then
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "fetch_ohif: npm is missing (apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@ohif/app@$VERSION" >/dev/null)
tarball=$tmp/ohif-app-$VERSION.tgz
echo "$SHASUM  $tarball" | sha1sum -c --quiet
mkdir -p "$tmp/x"
tar xzf "$tarball" -C "$tmp/x" --exclude='package/dist/ort' \
  --exclude='package/dist/dicom-microscopy-viewer'
rm -rf "$TARGET"
mkdir -p "$(dirname "$TARGET")"
mv "$tmp/x/package" "$TARGET"
echo "fetch_ohif: OHIF $VERSION in $TARGET ($(du -sh "$TARGET/dist" | cut -f1))"
