"""``python -m entrypoints.ray``'s command line: the HTTP server's flags plus scale-out (needs the [ray] extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from entrypoints.ray.__main__ import parse_ray_settings
from entrypoints.ray.app import ScaleSettings, build_application, engine_threads
from entrypoints.settings import ServerSettings


def test_server_flags_and_scale_out_flags_mix_in_any_order() -> None:
    argv = ["--replicas", "3", "--model", "m", "--replica-cpus=2", "--port", "9001", "--ray-address", "auto"]
    settings, scale, address = parse_ray_settings(argv)
    assert (settings.model, settings.port) == ("m", 9001)
    assert (scale.replicas, scale.replica_cpus, scale.by_prefix) == (3, 2.0, True)
    assert address == "auto"


def test_without_an_address_a_local_ray_instance_is_started() -> None:
    assert parse_ray_settings([])[2] is None


def test_least_loaded_routing_turns_prefix_affinity_off() -> None:
    assert not parse_ray_settings(["--routing", "least-loaded"])[1].by_prefix


@pytest.mark.parametrize("argv", [["--min-replicas", "1"], ["--min-replicas", "3", "--max-replicas", "2"]])
def test_autoscaling_needs_both_bounds_in_order(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_ray_settings(argv)


def test_a_cpu_replica_gets_torch_threads_for_its_own_cores() -> None:
    assert engine_threads(ServerSettings(), ScaleSettings(replica_cpus=3)).threads == 3
    assert engine_threads(ServerSettings(threads=5), ScaleSettings(replica_cpus=3)).threads == 5
    assert engine_threads(ServerSettings(), ScaleSettings(replica_gpus=1)).threads is None


def test_an_autoscaled_application_builds_without_a_cluster() -> None:
    app = build_application(ServerSettings(), ScaleSettings(min_replicas=1, max_replicas=4))
    assert app is not None


def test_the_rayservice_builder_takes_the_same_flags() -> None:
    from entrypoints.ray.serve_config import app  # noqa: PLC0415

    assert app({"argv": ["--replicas", "2", "--replica-gpus", "1"]}) is not None
