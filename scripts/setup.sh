#!/usr/bin/env bash
# Everything a fresh Debian machine needs: the DICOM tools the tests use (and openssl, which
# makes their throwaway TLS certificates), Orthanc's DICOMweb plugin, Chromium and npm for the
# viewer test (tests/viewer/), then a virtual environment with torch 2.13.0 (CPU build, on
# disk here) before anything that depends on it, and last the pinned OHIF Viewer build the
# viewer test serves (into the git-ignored cache/ohif/).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for tool in storescu dciodvfy Orthanc openssl chromium npm; do
  command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt=1
# PostgreSQL's server binaries (the store tests start their own server): not on PATH
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk dicom3tools orthanc openssl \
    orthanc-dicomweb chromium npm postgresql >/dev/null
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
