"""What more than one model's training uses: manifests and splits, metrics, CT series, plots.

Nothing here imports a model package; every model package may import from here.
"""
