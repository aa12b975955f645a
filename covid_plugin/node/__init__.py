"""DICOM networking only: the listener (scp.py) and the exporter (scu.py)."""
