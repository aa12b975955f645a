"""The series-level CT COVID-19 rule (models/ct-classifier): `python -m training ... ct-cls`.

Layers, each importing only those above it in this list: spec, card, evaluate, train.
"""
