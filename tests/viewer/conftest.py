"""The viewer test's peers: results from the project's own pipeline, Orthanc with DICOMweb,
OHIF behind a same-origin proxy, and Debian's Chromium driven by Playwright. All offline.

Started once per session (the pipeline run and the browser are the slow parts) and stopped
by PID. Missing tools skip the tests with the reason, except under CI, which installs them
(scripts/setup.sh) and must never report a skipped viewer test as a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.conftest import REPO, DicomwebOrthanc, dicomweb_missing
from tests.viewer.ohif import PageLog
from tests.viewer.server import viewer_server

OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO / "cache" / "ohif" / OHIF_VERSION / "dist"
CHROMIUM = Path(os.environ.get("VIEWER_TEST_CHROMIUM", "/usr/bin/chromium"))
SAMPLES = REPO / "dicom_samples"
# the first COVID CT and chest X-ray samples (dicom_samples/README.md lists them), and the
# NIH film, whose pixels are not square (ImagerPixelSpacing 1.3359 x 1.0944 mm)
CT_SAMPLE = sorted(SAMPLES.glob("ct-covid_*"))[0]
CXR_SAMPLE = sorted(SAMPLES.glob("cxr-covid_*"))[0]
NIH_SAMPLE = SAMPLES / "cxr-normal_nih-cxr14-PA"
SAMPLES_SHOWN = (CT_SAMPLE, CXR_SAMPLE, NIH_SAMPLE)
# the machine has no network: keep Chromium from trying, and render with SwiftShader (no GPU)
CHROMIUM_ARGS = [
    "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]
# OHIF's onboarding tour would cover the viewport on a first visit
NO_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


def _missing() -> str | None:
    if (reason := dicomweb_missing()) is not None:
        return reason
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if not (OHIF_DIST / "index.html").exists():
        return f"OHIF {OHIF_VERSION} is not in {OHIF_DIST} (bash scripts/fetch_ohif.sh)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="session")
def viewer_tools() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"viewer test cannot run in CI: {reason}")
    pytest.skip(reason)


@dataclass
class Study:
    """One sample study in Orthanc with the node's results beside it."""

    study_uid: str
    results: dict[str, list[pydicom.Dataset]]  # modality -> result objects (headers)
    sample: Path  # the dicom_samples/ folder it came from

    def source(self) -> pydicom.Dataset:
        """The header of the sample's first image."""
        return pydicom.dcmread(next(self.sample.glob("*.dcm")), stop_before_pixels=True)

    def result(self, modality: str) -> pydicom.Dataset:
        return self.results[modality][0]

    def segs(self) -> list[pydicom.Dataset]:
        """The SEG series in series-number order (lungs and lesions may be separate SEGs)."""
        return sorted(self.results.get("SEG", []), key=lambda ds: int(ds.SeriesNumber))


@dataclass
class Viewer:
    url: str
    ct: Study
    cxr: Study
    nih: Study  # a film with non-square pixels


def _run_pipeline(samples: list[Path], workdir: Path) -> dict[str, Study]:
    """`covid-plugin run` over the samples: the objects the node would send to a PACS."""
    inbox, out = workdir / "in", workdir / "out"
    for sample in samples:
        (inbox / sample.name).mkdir(parents=True)
        for path in sample.glob("*.dcm"):
            (inbox / sample.name / path.name).symlink_to(path)
    done = subprocess.run(
        [sys.executable, "-m", "covid_plugin.cli", "run", str(inbox), "--out", str(out)],
        cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"covid-plugin run failed:\n{done.stdout}\n{done.stderr}"
    studies: dict[str, Study] = {}
    for sample in samples:
        study_uid = str(pydicom.dcmread(next(sample.glob("*.dcm")),
                                        stop_before_pixels=True).StudyInstanceUID)
        results: dict[str, list[pydicom.Dataset]] = {}
        for path in sorted(out.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.StudyInstanceUID == study_uid:
                results.setdefault(str(ds.Modality), []).append(ds)
        assert results, f"no results for {sample.name}:\n{done.stdout}"
        studies[sample.name] = Study(study_uid, results, sample)
    return studies


@pytest.fixture(scope="session")
def viewer(viewer_tools, tmp_path_factory) -> Iterator[Viewer]:
    """Orthanc holding the CT and chest X-ray samples and their results, OHIF in front."""
    workdir = tmp_path_factory.mktemp("viewer")
    studies = _run_pipeline(list(SAMPLES_SHOWN), workdir)
    orthanc = DicomwebOrthanc(workdir / "orthanc").start()
    server = None
    try:
        sources = [path for sample in SAMPLES_SHOWN for path in sample.glob("*.dcm")]
        for path in [*sources, *(workdir / "out").rglob("*.dcm")]:
            orthanc.upload(path)
        server = viewer_server(OHIF_DIST, Path(__file__).with_name("app-config.js"),
                               orthanc.http_port).start()
        yield Viewer(server.url, studies[CT_SAMPLE.name], studies[CXR_SAMPLE.name],
                     studies[NIH_SAMPLE.name])
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


@pytest.fixture(scope="session")
def browser(viewer_tools) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh browser context per test (no state carried over), 1400x900 like a laptop."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_init_script(NO_TOUR)
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.log = PageLog().attach(page)
    yield page
    context.close()


@pytest.fixture(scope="session")
def screenshots_dir() -> Path | None:
    """Set VIEWER_TEST_SCREENSHOTS=docs/viewer to refresh the README's pictures (not a
    COVID_PLUGIN_* name: the node's config reads every variable with that prefix)."""
    folder = os.environ.get("VIEWER_TEST_SCREENSHOTS")
    if not folder:
        return None
    path = Path(folder) if Path(folder).is_absolute() else REPO / folder
    path.mkdir(parents=True, exist_ok=True)
    return path

