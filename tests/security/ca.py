"""A throw-away certificate authority for the security tests, made with the `openssl` command
(the `cryptography` package is not a dependency). EC P-256 keys: quick to make."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as files; `ca` is the issuing CA's certificate."""

    name: str
    cert: Path
    key: Path
    ca: Path

    def env(self, **extra: str) -> dict[str, str]:
        """MECBENCH_TLS_* variables giving a process this identity (and `extra` TLS settings:
        client_auth="true", allowed_clients="a,b", ...)."""
        env = {"MECBENCH_TLS_CERT": str(self.cert), "MECBENCH_TLS_KEY": str(self.key), "MECBENCH_TLS_CA": str(self.ca)}
        env |= {f"MECBENCH_TLS_{name.upper()}": value for name, value in extra.items()}
        return env


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class CertificateAuthority:
    def __init__(self, directory: Path, name: str = "MECBench test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(self.key), "-out", str(self.cert), "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )

    def issue(self, common_name: str, sans: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost")) -> Identity:
        """A certificate for `common_name`, good as a server's and as a client's."""
        cert = self.directory / f"{common_name}.pem"
        key = self.directory / f"{common_name}.key"
        request = self.directory / f"{common_name}.csr"
        extensions = self.directory / f"{common_name}.ext"
        extensions.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
            f"subjectAltName={','.join(sans)}\n"
        )
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(request), "-subj", f"/CN={common_name}",
            cwd=self.directory,
        )
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", DAYS, "-extfile", str(extensions),
            cwd=self.directory,
        )
        return Identity(common_name, cert, key, self.cert)
