"""``python -m entrypoints.ray``: the same API as ``entrypoints.http``, served by engine replicas on Ray Serve."""
