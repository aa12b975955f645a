"""covid_plugin: a DICOM node running chest X-ray and CT COVID-19 models (research use only)."""

__version__ = "0.1.0"
