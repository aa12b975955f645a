"""Preprocessing and model loading shared by the node and training: the one source of truth."""
