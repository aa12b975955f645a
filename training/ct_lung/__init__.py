"""The rule-based CT lung segmentation as a model folder (models/ct-lung).

Layers, each importing only those above it in this list: spec, card, evaluate, train.
"""
