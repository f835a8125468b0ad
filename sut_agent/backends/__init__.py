"""Backend registry: the SutConfig `backend` oneof name -> a factory that builds a ready backend.

Factories raise `InvalidArgument` (with `config.<backend>.<field>` paths) for what can only be
checked while building (a model file that does not load, an input name it lacks), and build
nothing in that case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mecbench.core.errors import Unimplemented
from mecbench.v1 import sut_agent_pb2
from sut_agent.backends.base import Backend, Completion, CompletionCallback
from sut_agent.settings import SutAgentSettings

BackendFactory = Callable[[sut_agent_pb2.SutConfig, SutAgentSettings], Backend]


def _synthetic(config: sut_agent_pb2.SutConfig, settings: SutAgentSettings) -> Backend:
    from sut_agent.backends.synthetic import SyntheticBackend

    return SyntheticBackend(config.synthetic, spin_us=settings.synthetic_spin_us)


def _onnxruntime(config: sut_agent_pb2.SutConfig, settings: SutAgentSettings) -> Backend:
    # Imported on use: onnxruntime takes a while to import and only this backend needs it.
    from sut_agent.backends.onnx import OnnxRuntimeBackend

    return OnnxRuntimeBackend(config.onnxruntime, model_dir=settings.model_dir)


def _external(
    config: sut_agent_pb2.SutConfig, settings: SutAgentSettings, cluster_values: Mapping[str, str] | None = None
) -> Backend:
    from sut_agent.backends.external import ExternalBackend

    return ExternalBackend(
        config.external,
        profiles_path=settings.server_profiles,
        log_path=settings.server_log_path,
        model_dir=settings.model_dir,
        allow_request_commands=settings.allow_request_commands,
        server_env=dict(config.env),
        cluster_values=cluster_values,
    )


BACKENDS: dict[str, BackendFactory] = {
    "synthetic": _synthetic,
    "onnxruntime": _onnxruntime,
    "external": _external,
}


def create_backend(
    config: sut_agent_pb2.SutConfig, settings: SutAgentSettings, cluster_values: Mapping[str, str] | None = None
) -> Backend:
    """A ready backend for `config`. `cluster_values` (`{cluster_address}`, `{cluster_size}`) reach
    the launch profile of a cluster head's server."""
    kind = config.WhichOneof("backend")
    if kind == "external":
        return _external(config, settings, cluster_values)
    factory = BACKENDS.get(kind or "")
    if factory is None:
        raise Unimplemented(f"{kind} backend: not yet available")
    return factory(config, settings)


__all__ = ["BACKENDS", "Backend", "BackendFactory", "Completion", "CompletionCallback", "create_backend"]
