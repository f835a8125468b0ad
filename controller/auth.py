"""Bearer tokens on the controller API, with a role per token.

The tokens file (`MECBENCH_CONTROLLER_TOKENS_FILE`, YAML or JSON) holds SHA-256 digests of the
tokens, never the tokens, so reading it does not let anyone call the controller:

    tokens:
      - {name: alice, role: read, sha256: 9f86d08...}
      - {name: ci, role: run, sha256: 60303ae...}

`mecbench token create --name alice --role read` makes a token and prints its entry. Roles:
`read` may call Get*, List* and Watch* methods; `run` may call everything. Health and reflection
stay open (the interceptor never asks about them). No file: no authentication (a local stack).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from mecbench.core.errors import PermissionDenied, Unauthenticated
from mecbench.core.settings import SettingsError

ROLES = ("read", "run")
READ_PREFIXES = ("Get", "List", "Watch")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS = {"name", "role", "sha256"}
# Fields someone might put a token itself in: refused with a message saying what to do instead.
_PLAINTEXT_FIELDS = {"token", "value", "secret", "plaintext", "password"}


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str
    digest: bytes


def parse_tokens(data: Any, source: str) -> list[TokenEntry]:
    """The entries of a parsed tokens file; SettingsError naming `source` and the entry when it
    is not a valid one."""
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise SettingsError(f"{source}: expected a mapping with a `tokens` list")
    unknown_top = set(data) - {"tokens"}
    if unknown_top:
        raise SettingsError(f"{source}: unknown keys {sorted(unknown_top)}")
    entries: list[TokenEntry] = []
    for index, item in enumerate(data["tokens"]):
        where = f"{source}: tokens[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(f"{where}: expected a mapping with name, role and sha256")
        plaintext = _PLAINTEXT_FIELDS & set(item)
        if plaintext:
            raise SettingsError(
                f"{where}: has a {sorted(plaintext)[0]!r} field; the file holds only the SHA-256 of each"
                " token (sha256:), never the token (`mecbench token create` prints both)"
            )
        unknown = set(item) - _ENTRY_FIELDS
        missing = _ENTRY_FIELDS - set(item)
        if unknown or missing:
            problems = ([f"unknown {sorted(unknown)}"] if unknown else []) + (
                [f"missing {sorted(missing)}"] if missing else []
            )
            raise SettingsError(f"{where}: {', '.join(problems)} (fields: name, role, sha256)")
        name, role, digest = item["name"], item["role"], item["sha256"]
        if not isinstance(name, str) or not name.strip():
            raise SettingsError(f"{where}: name must be a non-empty string")
        if role not in ROLES:
            raise SettingsError(f"{where} ({name}): role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(digest, str) or not _HEX_DIGEST.match(digest.lower()):
            raise SettingsError(f"{where} ({name}): sha256 must be 64 hexadecimal digits")
        if any(entry.name == name for entry in entries):
            raise SettingsError(f"{where}: name {name!r} appears twice")
        entries.append(TokenEntry(name=name, role=role, digest=bytes.fromhex(digest)))
    if not entries:
        raise SettingsError(f"{source}: no tokens (unset MECBENCH_CONTROLLER_TOKENS_FILE to turn authentication off)")
    return entries


def load_tokens(path: Path) -> list[TokenEntry]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"MECBENCH_CONTROLLER_TOKENS_FILE={path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not YAML or JSON: {exc}") from None
    return parse_tokens(data, str(path))


def is_read_method(method: str) -> bool:
    """Whether a full method name (`/mecbench.v1.Controller/GetRun`) only reads."""
    return method.rpartition("/")[2].startswith(READ_PREFIXES)


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class TokenAuthorizer:
    """The controller's `mecbench.core.interceptor.Authorizer`: who the bearer token names, or
    UNAUTHENTICATED (no token, an unknown one) / PERMISSION_DENIED (a role that may not call it)."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self._entries = list(entries)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthorizer:
        return cls(load_tokens(path))

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, method: str, context: grpc.ServicerContext) -> str | None:
        token = _bearer_token(tuple(context.invocation_metadata() or ()))
        if not token:
            raise Unauthenticated("this controller needs a bearer token (authorization: Bearer TOKEN)")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: TokenEntry | None = None
        # Every entry is compared, in constant time, so how long this takes says nothing about
        # which digest (if any) matched or how much of it.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthenticated("the bearer token is not known to this controller")
        if found.role != "run" and not is_read_method(method):
            raise PermissionDenied(
                f"token {found.name!r} has role {found.role!r}, which may call only Get*, List* and Watch*"
                f" methods, not {method.rpartition('/')[2]}"
            )
        return found.name
