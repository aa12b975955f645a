#!/usr/bin/env bash
# Everything a fresh Debian machine needs: the DICOM tools the tests use (and openssl, which
# makes their throwaway TLS certificates), Orthanc's DICOMweb plugin, Chromium and npm for the
# viewer test (tests/viewer/), PostgreSQL's server for the store tests, then a virtual
# environment with torch 2.13.0 (CPU build, on disk here) before anything that depends on it,
# and last the pinned OHIF Viewer build the viewer test serves (into the git-ignored cache/ohif/).
# Only the Debian packages whose tool is missing are installed: a machine whose Node.js comes
# from NodeSource already has an npm, and Debian's npm package conflicts with that nodejs
# ("held broken packages"), so a working npm is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
want() {  # want PACKAGE TEST...: the package is missing when the test fails
  local package=$1; shift
  "$@" >/dev/null 2>&1 || missing+=("$package")
}
want dcmtk command -v storescu
want dicom3tools command -v dciodvfy
want orthanc command -v Orthanc
want orthanc-dicomweb test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so
want openssl command -v openssl
want chromium command -v chromium
want npm command -v npm
# PostgreSQL's server binaries (the store tests start their own server): not on PATH
want postgresql compgen -G "/usr/lib/postgresql/*/bin/initdb"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  # the packages start a system Orthanc on 4242/8042 and PostgreSQL on 5432; the tests start
  # their own
  $SUDO service orthanc stop >/dev/null 2>&1 || true
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[train,dev]'
bash scripts/fetch_ohif.sh
