"""The CT lesion UNet (models/ct-lesion): `python -m training train|evaluate ct-lesion`.

Layers, each importing only those above it in this list: data, window, tradeoff, card,
evaluate, train.
"""
