"""Every transfer syntax the listener accepts decodes with pylibjpeg, GDCM blocked.

This is why python-gdcm is not a dependency: the worker must decode whatever the listener
acknowledged, and pylibjpeg's plugins (libjpeg, openjpeg, rle) cover all the compressed
syntaxes. The files are real ones from the shared data set; the uncompressed byte orders
pydicom cannot write are made with DCMTK's dcmconv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from covid_plugin.node.scp import TRANSFER_SYNTAXES
from tests.conftest import DATA, REPO, rider_files

pytestmark = [pytest.mark.data,
              pytest.mark.skipif(shutil.which("dcmconv") is None, reason="needs DCMTK")]

CORNERSTONE = DATA / "dicom" / "cornerstone_ctimage_chest-ct-transfer-syntaxes"
FILES = [
    *sorted(CORNERSTONE.glob("*.dcm")),  # 4.50 4.51 4.57 4.70 4.80 4.90 RLE deflated: one image
    DATA / "dicom" / "nema-wg04_CT1_chest-ct" / "CT1_JLSN.dcm",  # JPEG-LS near-lossless
    DATA / "dicom" / "nema-wg04_RG1_chest-cr" / "RG1_J2KI.dcm",  # JPEG 2000 (lossy)
    DATA / "dicom" / "gdcm-toshiba_ct-lung-bases-j2k" / "TOSHIBA_J2K_OpenJPEGv2Regression.dcm",
]
LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"}

# runs in a fresh interpreter where `import gdcm` fails, compressed data forced to pylibjpeg
DECODE = """
import hashlib, json, sys
sys.modules["gdcm"] = None
import pydicom
from pydicom.pixels import get_decoder
out = []
for path in sys.argv[1:]:
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    plugin = "pylibjpeg" if syntax.is_compressed else ""
    arr = ds.pixel_array_options(decoding_plugin=plugin) or ds.pixel_array
    out.append({"path": path, "syntax": str(syntax), "shape": list(arr.shape),
                "sha": hashlib.sha256(arr.astype("<i4").tobytes()).hexdigest(),
                "nonzero": int((arr != 0).sum()),
                "plugins": list(get_decoder(syntax).available_plugins)})
print(json.dumps(out))
"""


def _convert(source: Path, option: str, target: Path) -> Path:
    subprocess.run(["dcmconv", option, str(source), str(target)], check=True,
                   capture_output=True)
    return target


def test_every_accepted_transfer_syntax_decodes_without_gdcm(tmp_path: Path):
    rider = rider_files(1)[0]
    orders = [_convert(rider, option, tmp_path / f"{name}.dcm")
              for option, name in (("+te", "explicit"), ("+tb", "big"), ("+ti", "implicit"))]
    files = [*FILES, *orders]
    result = subprocess.run([sys.executable, "-c", DECODE, *map(str, files)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    decoded = json.loads(result.stdout)
    assert set(TRANSFER_SYNTAXES) <= {d["syntax"] for d in decoded}
    for d in decoded:
        assert "gdcm" not in d["plugins"], d["path"]
        assert d["nonzero"] > 0 and len(d["shape"]) >= 2, d["path"]
    # the lossless encodings of the cornerstone image give back the very same pixels
    cornerstone = [d for d in decoded if d["path"].startswith(str(CORNERSTONE))]
    reference = next(d["sha"] for d in cornerstone if d["syntax"].endswith(".1.2.1.99"))
    for d in cornerstone:
        if d["syntax"] in LOSSLESS:
            assert d["sha"] == reference, d["syntax"]
    # and the three byte orders of the RIDER slice too
    assert len({d["sha"] for d in decoded if d["path"] in map(str, orders)}) == 1
