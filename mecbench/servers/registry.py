"""Server types by name: the built-in ones, and any a plugin package registers under the
`mecbench.server_types` entry-point group (`my_server = "my_pkg.module:MyServer"`), so a new
server type is one small class and a line in its package's metadata."""

from __future__ import annotations

import importlib
from importlib import metadata

from mecbench.core.logging import get_logger
from mecbench.servers.base import ServerType

log = get_logger("mecbench.servers.registry")

ENTRY_POINT_GROUP = "mecbench.server_types"

# Also declared as entry points in pyproject.toml; listed here so a source checkout that was
# never installed still has them.
BUILT_IN = {
    "openai": "mecbench.servers.openai:OpenAIServer",
    "kserve_v2_http": "mecbench.servers.kserve:KServeHttpServer",
    "kserve_v2_grpc": "mecbench.servers.kserve:KServeGrpcServer",
    "ollama": "mecbench.servers.ollama:OllamaServer",
}


def _load(reference: str) -> type[ServerType]:
    module_name, _, attribute = reference.partition(":")
    loaded = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(loaded, type) and issubclass(loaded, ServerType)):
        raise TypeError(f"{reference} is not a ServerType subclass")
    return loaded


def server_types() -> dict[str, str]:
    """Every known server type name -> where its class is (module:attribute)."""
    found = dict(BUILT_IN)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.value)
        if found[entry.name] != entry.value and entry.name not in BUILT_IN:
            log.warning("server_type_registered_twice", name=entry.name, kept=found[entry.name], ignored=entry.value)
    return found


def load_server_type(name: str) -> type[ServerType] | None:
    """The class registered as `name`, imported on use; None when no such name is registered.
    A plugin that fails to import raises, naming itself: a broken install must not look like a
    missing one."""
    reference = server_types().get(name)
    if reference is None:
        return None
    try:
        return _load(reference)
    except Exception as exc:
        raise RuntimeError(f"server type {name!r} ({reference}) failed to load: {exc}") from exc
