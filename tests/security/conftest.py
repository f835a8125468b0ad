"""Certificates for the security tests: one CA the services trust, one they do not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.security.ca import CertificateAuthority, Identity


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    # The controller's identity; the agents it starts inherit it.
    controller: Identity
    # Signed by the same CA, but not an allowed caller of the agents.
    intruder: Identity
    # Signed by a CA nobody trusts.
    stranger: Identity


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"))
    other = CertificateAuthority(tmp_path_factory.mktemp("other-ca"), name="Somebody else's CA")
    return Pki(ca, ca.issue("controller"), ca.issue("intruder"), other.issue("controller"))
