"""covid_plugin: a DICOM node that runs chest X-ray and chest CT COVID-19 models (research use only)."""

__version__ = "0.1.0"
