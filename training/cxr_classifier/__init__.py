"""The chest X-ray classifier (models/cxr-classifier): `python -m training train|evaluate cxr`.

Layers, each importing only those above it in this list: options, data, model, scoring,
probes, pointing, export, evaluate, train, compare.
"""
