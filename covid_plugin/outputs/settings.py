"""How the writers identify themselves and number their series; one value per node."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid

from covid_plugin import __version__


@dataclass(frozen=True)
class OutputSettings:
    """Equipment identity, series numbers and descriptions of the objects the node creates.

    Institution attributes are left out on purpose: the node is not the acquiring site.
    Series descriptions stay short (about 24 characters) because viewers cut them off in
    their series thumbnails; the research-use caveat travels in the objects themselves.
    """

    manufacturer: str = "covid_plugin"
    model_name: str = "covid_plugin"
    software_version: str = __version__
    device_serial_number: str = "0"
    sr_series_number: int = 9901
    seg_series_number: int = 9902
    sc_series_number: int = 9903
    pr_series_number: int = 9904
    declined_series_number: int = 9905
    lesion_seg_series_number: int = 9906
    sr_series_description: str = "AI report (RUO)"
    seg_series_description: str = "AI lungs (RUO)"
    lesion_seg_series_description: str = "AI lesions (RUO)"
    sc_series_description: str = "AI overlay (RUO)"
    pr_series_description: str = "AI outlines (RUO)"
    declined_series_description: str = "AI not analysed (RUO)"
    omit_empty_frames: bool = True
    # Bounds on the secondary capture's longer side: big radiographs are scaled down to stay
    # small, small images are scaled up so that the burned-in text stays legible.
    sc_max_size: int = 1024
    sc_min_size: int = 512

    @property
    def device_uid(self) -> str:
        """A stable UID for the device observer, the same on every report of one installation."""
        return generate_uid(
            entropy_srcs=[self.manufacturer, self.model_name, self.device_serial_number]
        )
