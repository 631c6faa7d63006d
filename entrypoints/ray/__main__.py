"""``python -m entrypoints.ray``: the HTTP server's flags plus replicas and Ray's address; serve until SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

import attrs
import ray
import structlog
from ray import serve

from adapters.huggingface.loading import ModelNotFoundError, resolve_model
from entrypoints.http.__main__ import at_least, build_parser, parse_settings, positive_number
from entrypoints.http.security import warn_if_exposed
from entrypoints.logs import configure_logging
from entrypoints.ray.app import APP_NAME, INGRESS, ScaleSettings, build_application
from entrypoints.settings import ServerSettings

RAY_FLAGS = frozenset(
    {"replicas", "min_replicas", "max_replicas", "ray_address", "replica_cpus", "replica_gpus", "imbalance", "routing"}
)


def build_ray_parser() -> argparse.ArgumentParser:
    """The HTTP server's command line, and how to scale out."""
    parser = build_parser()
    parser.prog = "python -m entrypoints.ray"
    parser.description = "OpenAI-compatible server for a HuggingFace model, scaled out on Ray Serve."
    group = parser.add_argument_group("scale-out (Ray Serve)")
    group.add_argument("--replicas", type=at_least(1), default=1, metavar="N", help="engine replicas (default: 1)")
    group.add_argument(
        "--min-replicas", type=at_least(0), metavar="N", help="autoscale from N replicas (with --max-replicas)"
    )
    group.add_argument("--max-replicas", type=at_least(1), metavar="N", help="autoscale up to N replicas")
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join a running Ray cluster ('auto' or host:port); default: start a local Ray instance, stopped at exit",
    )
    group.add_argument(
        "--replica-cpus", type=positive_number, default=1.0, metavar="N", help="CPUs per replica (default: 1)"
    )
    group.add_argument("--replica-gpus", type=float, default=0.0, metavar="N", help="GPUs per replica (default: 0)")
    group.add_argument(
        "--imbalance",
        type=at_least(0),
        default=ScaleSettings().imbalance,
        metavar="N",
        help="requests more than the least loaded replica that the replica holding a prompt's prefix may have and "
        "still get it (default: %(default)s)",
    )
    group.add_argument(
        "--routing",
        choices=("prefix", "least-loaded"),
        default="prefix",
        help="send a prompt to the replica holding its prefix, or to the least loaded one (default: %(default)s)",
    )
    return parser


def parse_ray_settings(argv: Sequence[str] | None = None) -> tuple[ServerSettings, ScaleSettings, str | None]:
    """The server's settings, the scale-out settings, and the Ray address (``None``: start a local instance)."""
    args = vars(build_ray_parser().parse_args(argv))
    if (args["min_replicas"] is None) != (args["max_replicas"] is None):
        build_ray_parser().error("--min-replicas and --max-replicas go together")
    if args["min_replicas"] is not None and args["min_replicas"] > args["max_replicas"]:
        build_ray_parser().error("--min-replicas must not exceed --max-replicas")
    server_argv = _server_argv(argv if argv is not None else sys.argv[1:])
    scale = ScaleSettings(
        **{key: args[key] for key in RAY_FLAGS - {"ray_address", "routing"}}, by_prefix=args["routing"] == "prefix"
    )
    return parse_settings(server_argv), scale, args["ray_address"]


def _server_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the scale-out flags (and their values), for the HTTP server's own parser."""
    flags = {f"--{name.replace('_', '-')}" for name in RAY_FLAGS}
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Start (or join) Ray, deploy the app, serve until SIGTERM/SIGINT, drain, shut Serve and our Ray down."""
    settings, scale, address = parse_ray_settings(argv)
    configure_logging(settings.log_level, log_format=settings.log_format)
    log = structlog.get_logger("entrypoints.ray")
    try:
        resolve_model(settings.model)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201  the one line the user reads
        return 2
    ray.init(address=address, include_dashboard=False, log_to_driver=settings.log_level == "DEBUG")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, scale), name=APP_NAME, route_prefix="/", blocking=False)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("server.starting", url=f"http://{host}:{settings.port}/v1", replicas=attrs.asdict(scale))
        warn_if_exposed(settings)
        stop.wait()
        log.info("server.draining", grace_seconds=settings.shutdown_timeout)
        left = (
            serve.get_deployment_handle(INGRESS, APP_NAME)
            .drain.remote()
            .result(timeout_s=settings.shutdown_timeout + 10)
        )
        log.info("server.drained", requests_cut_short=left)
    finally:
        if address is None:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
        log.info("server.stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
