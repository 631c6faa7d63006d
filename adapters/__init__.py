"""Implementations of the domain ports: HuggingFace/torch, Jinja, stop sequences."""
