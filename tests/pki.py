"""Throwaway certificates for TLS tests and the TLS bench row (`cryptography`, as
Debian ships it): nothing here is fit for anything but 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          signer: ec.EllipticCurvePrivateKey, ca: bool, until: datetime.datetime,
          ip: bool = False) -> x509.Certificate:  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 2 * DAY)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, hashes.SHA256())


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    store_cert: Path
    store_key: Path
    expired_cert: Path
    client_cert: Path
    client_key: Path


def make_pki(d: Path) -> Pki:
    """A throwaway CA, a second CA, and certificates for a store (IP 127.0.0.1, valid,
    and expired) and a client, as PEM files in `d`."""
    files: dict[str, bytes] = {}
    for ca_name in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        cert = _cert(ca_name, key, name, key, True, NOW + 30 * DAY)
        files[ca_name] = cert.public_bytes(serialization.Encoding.PEM)
        files[ca_name + ".key"] = _key_pem(key)
    ca_key = serialization.load_pem_private_key(files["ca.key"], None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate(files["ca"]).subject
    for name, until, ip in (("store", NOW + 30 * DAY, True), ("expired", NOW - DAY, True),
                            ("client", NOW + 30 * DAY, False)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        files[name] = _cert(name, key, ca_name, ca_key, False, until, ip).public_bytes(
            serialization.Encoding.PEM
        )
        files[name + ".key"] = _key_pem(key)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(d / "ca", d / "other_ca", d / "store", d / "store.key", d / "expired",
               d / "client", d / "client.key")  # fmt: skip
