"""A throwaway PKI for trying TLS on a lab broker or OPC UA server: a CA, a server and a client
certificate, generated with ``cryptography`` (nothing downloaded). The bridge's tests and the stream
benchmark use it; never use these certificates in production.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_pki"]


def make_pki(where: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A throwaway CA, a server certificate for ``hosts`` and a client certificate, as PEM files.

    Also an OPC UA-style application certificate pair (DER) for each side; all generated with
    ``cryptography``, nothing downloaded.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    where.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("twinflow test CA")).issuer_name(name("twinflow test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn, usage, sans):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    out = {}

    def write(stem, k, cert):
        out[f"{stem}_key"] = where / f"{stem}.key"
        out[f"{stem}_cert"] = where / f"{stem}.crt"
        out[f"{stem}_key"].write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        out[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    write("ca", ca_key, ca)
    write("server", *leaf("twinflow test broker", ExtendedKeyUsageOID.SERVER_AUTH, sans))
    write("client", *leaf("twinflow bridge", ExtendedKeyUsageOID.CLIENT_AUTH, []))
    return out
