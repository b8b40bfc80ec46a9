"""
Test certificates, made fresh for each test that serves TLS: a CA and a
server certificate it signs (what a real deployment has: the client
trusts the CA), or one self-signed certificate that is its own CA.

Every test that needs TLS on 127.0.0.1 makes its certificates here, so
that the extensions a strict verifier asks for (basic constraints, key
usage, subject alternative names, key identifiers) are right in one
place.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The hosts a certificate for the local machine names.
LOCAL_HOSTS = ("127.0.0.1", "localhost")

#: How far back a certificate's validity starts (clocks of the test's own
#: processes agree, but a little slack costs nothing).
SLACK = datetime.timedelta(minutes=5)

Key = ec.EllipticCurvePrivateKey


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP address names, anything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(
    key: Key, subject: x509.Name, issuer: x509.Name, not_before: datetime.datetime, not_after: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def make_ca(valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> tuple[Key, x509.Certificate]:
    """
    A CA (it signs certificates and nothing else) valid from a little
    before now for C{valid_for}.
    """
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smeldr test CA")])
    now = _now()
    certificate = (
        _builder(key, name, name, now - SLACK, now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def make_server(
    ca_key: Key,
    ca: x509.Certificate,
    hosts: Sequence[str] = LOCAL_HOSTS,
    not_after: Optional[datetime.datetime] = None,
) -> tuple[Key, x509.Certificate]:
    """
    A server certificate for C{hosts} signed by C{ca}.

    @param not_after: the end of its validity (default: a day from now); one
        in the past makes an expired certificate (its validity then starts
        a day before it ends).
    """
    key = new_key()
    now = _now()
    if not_after is None:
        not_after = now + datetime.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    not_before = min(now - SLACK, not_after - datetime.timedelta(days=1))
    certificate = (
        _builder(key, subject, ca.subject, not_before, not_after)
        .add_extension(_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def self_signed(hosts: Sequence[str] = LOCAL_HOSTS) -> tuple[Key, x509.Certificate]:
    """
    A certificate for C{hosts} that is its own CA, valid for a day: for a
    server the test's client is told to trust directly.
    """
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = _now()
    certificate = (
        _builder(key, name, name, now - SLACK, now + datetime.timedelta(days=1))
        .add_extension(_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate
