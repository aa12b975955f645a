"""Training and evaluation of the shipped models: `python -m training train|evaluate MODEL`.

One package per model, each writing its own folder under models/ (weights, spec.json,
metrics.json, card.md): cxr_classifier (cxr), cxr_lungs (cxr-lung), ct_lung, ct_lesion,
ct_cls. What more than one model uses lives in common/. A model package imports only itself
and common/ (tests/test_import_graph.py checks that, and that no import cycle exists).
"""
