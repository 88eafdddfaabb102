"""OPC UA Basic256Sha256 SignAndEncrypt with certificates and user login, against an in-process asyncua server."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from twinflow import lake as lk
from twinflow.errors import ServiceUnavailable
from twinflow.tasks.bridge.buffer import Buffer
from twinflow.tasks.bridge.config import BridgeConfig
from twinflow.tasks.bridge.opcua import OpcuaBridgeSource
from twinflow.tasks.bridge.run import run_bridge
from twinflow.tasks.bridge.simulate import OpcuaPlant, cmapss_rows

pytestmark = pytest.mark.integration

PASSWORD = "opc-pw-7d41c0-never-log-me"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_cert(where: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """An OPC UA application instance certificate (DER) and key (PEM), made with ``cryptography``."""
    import ipaddress

    from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, \
        generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    sans = [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(socket.gethostname())]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = generate_self_signed_app_certificate(key, name, {}, sans, usage, days=2)
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.der").write_bytes(cert.public_bytes(Encoding.DER))
    (where / f"{name}.pem").write_bytes(dump_private_key_as_pem(key))
    return where / f"{name}.der", where / f"{name}.pem"


@pytest.fixture
def secure_plant(tmp_path):
    pki = tmp_path / "pki"
    server_cert, server_key = _app_cert(pki / "server", "plant", "urn:freeopcua:python:server", server=True)
    client_cert, client_key = _app_cert(pki / "client", "bridge", "urn:twinflow:bridge", server=False)
    rogue_cert, rogue_key = _app_cert(pki / "rogue", "rogue", "urn:twinflow:bridge", server=False)
    other_server, _ = _app_cert(pki / "other", "other-plant", "urn:freeopcua:python:server", server=True)
    trusted = pki / "trusted-clients"
    trusted.mkdir()
    (trusted / "bridge.der").write_bytes(client_cert.read_bytes())
    plant = OpcuaPlant(f"opc.tcp://127.0.0.1:{_free_port()}/twinflow/secure", ["unit-1", "unit-2"], ["s2", "s3"],
                       security={"certificate": server_cert, "private_key": server_key,
                                 "trusted_clients": [trusted], "users": {"operator": PASSWORD}}).start()
    files = {"server_cert": server_cert, "client_cert": client_cert, "client_key": client_key,
             "rogue_cert": rogue_cert, "rogue_key": rogue_key, "other_server": other_server}
    yield plant, files
    plant.stop()


def _section(plant, files, **over):
    sec = plant.bridge_config(publishing_interval_ms=20)
    sec.update({"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
                "certificate": str(files["client_cert"]), "private_key": str(files["client_key"]),
                "trusted_server_certificates": [str(files["server_cert"])], "username": "operator",
                "password": PASSWORD, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5, **over})
    return sec


def test_sign_and_encrypt_with_user_login_delivers_rows_and_keeps_the_password_out_of_logs(
        secure_plant, tmp_path, caplog):
    plant, files = secure_plant
    caplog.set_level(logging.DEBUG)
    lake, quar = str(tmp_path / "lake"), str(tmp_path / "q")
    rows = [r for r in cmapss_rows(units=2, max_cycles=10)]
    plant.publish_rows(rows)
    cfg = BridgeConfig(bridge_id="secure", opcua=_section(plant, files), batch_rows=10, flush_interval_s=0.2,
                       emit_events=False)
    assert PASSWORD not in repr(cfg) and PASSWORD not in cfg.model_dump_json()
    stop, out = threading.Event(), {}
    th = threading.Thread(target=lambda: out.setdefault("stats", run_bridge(cfg, lake, quar, stop=stop,
                                                                            max_seconds=90)))
    th.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (lk.snapshot(lake, "stream") is None or
                                               lk.read_lake(lk.snapshot(lake, "stream"), ["cycle"]).num_rows < len(rows)):
            time.sleep(0.2)
    finally:
        stop.set()
        th.join(60)
    assert out["stats"].rows_written == len(rows)
    # the bridge's own records and its OPC UA client's (the in-process server's are the plant's, not ours)
    ours = [r for r in caplog.records if not r.name.startswith("asyncua.server")]
    assert ours and not [r.name for r in ours if PASSWORD in r.getMessage()]
    status = lk.meta_path(lake, "bridge-secure-status.json").read_text()
    assert PASSWORD not in status


@pytest.mark.parametrize("case, expect", [
    ("wrong password", "BadUserAccessDenied (wrong username or password)"),
    ("untrusted client certificate", "the server does not trust this client's certificate"),
    ("untrusted server certificate", "BadCertificateUntrusted (the server's certificate 'CN=plant' is not in"),
])
def test_a_wrong_certificate_or_password_is_refused_with_a_clear_error(secure_plant, case, expect):
    plant, files = secure_plant
    over = {"wrong password": {"password": "not-the-password"},
            "untrusted client certificate": {"certificate": str(files["rogue_cert"]),
                                             "private_key": str(files["rogue_key"])},
            "untrusted server certificate": {"trusted_server_certificates": [str(files["other_server"])]}}[case]
    cfg = BridgeConfig(bridge_id="refused", opcua=_section(plant, files, **over), emit_events=False)
    src = OpcuaBridgeSource(cfg.opcua, Buffer(100))
    with pytest.raises(ServiceUnavailable) as err:
        src.start(timeout_s=8)
    assert expect in str(err.value), str(err.value)
    assert PASSWORD not in str(err.value)


def test_a_secured_source_needs_its_certificates_and_a_trust_list(secure_plant):
    plant, files = secure_plant
    with pytest.raises(ValueError, match="needs trusted_server_certificates"):
        BridgeConfig(opcua=_section(plant, files, trusted_server_certificates=[]))
    with pytest.raises(ValueError, match="needs certificate and private_key"):
        BridgeConfig(opcua=_section(plant, files, certificate=None))
