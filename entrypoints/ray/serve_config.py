"""The application builder ``serve run`` / ``serve deploy`` and KubeRay's ``RayService`` import on a running cluster.

``import_path: entrypoints.ray.serve_config:app`` with ``args: {argv: [...]}``: the flags of ``python -m
entrypoints.ray`` (``--host``/``--port`` and ``--ray-address`` are the cluster's business there and are ignored).
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from entrypoints.ray.__main__ import parse_ray_settings
from entrypoints.ray.app import build_application


def app(args: dict[str, Any]) -> Application:
    """The Serve application for ``args["argv"]``."""
    settings, scale, _ = parse_ray_settings([str(arg) for arg in args.get("argv", [])])
    return build_application(settings, scale)
