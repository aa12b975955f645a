"""The CXR lung segmenter (models/cxr-lung), distilled from the cheXwhatsApp lung U-Net (MIT).

Layers, each importing only those above it in this list: data, teacher, model, targets,
evaluate, train (which evaluates the model it wrote).
"""
