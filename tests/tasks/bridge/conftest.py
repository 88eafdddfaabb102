"""Fixtures of the bridge tests: a real mosquitto broker on a free loopback port, one per test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from twinflow.tasks.bridge.testpki import make_pki

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if Path(p).exists()), None)


@pytest.fixture
def mosquitto(tmp_path):
    """(host, port) of a mosquitto started for this test (not the system service)."""
    exe = mosquitto_binary()
    if exe is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; `make test` does it)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # Queue everything for offline persistent sessions: the restart test publishes while the bridge is down.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                    "max_inflight_messages 0\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {proc.stderr.read().decode()[:500]}")
            time.sleep(0.05)
    yield "127.0.0.1", port
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


# The attack run's poison set (issue 25), as raw MQTT payloads.
POISON = {
    "400-digit int": b'{"asset_id": "u1", "cycle": 1, "s2": ' + b"9" * 400 + b"}",
    "5000-digit int": b'{"asset_id": "u1", "cycle": ' + b"7" * 5000 + b"}",
    "100k nested brackets": b"[" * 100_000 + b"]" * 100_000,
    "cycle >= 2^63": json.dumps({"asset_id": "u1", "cycle": 2**63, "s2": 642.0}).encode(),
    "lone surrogate asset": b'{"asset_id": "\\ud800", "cycle": 1, "s2": 642.0}',
}


@pytest.fixture
def poison() -> dict[str, bytes]:
    """The named poison messages: name -> payload."""
    return dict(POISON)


@pytest.fixture
def pki_factory():
    """:func:`make_pki` for tests that need a second, unrelated PKI."""
    return make_pki


@pytest.fixture
def tls_mosquitto(tmp_path):
    """A mosquitto requiring TLS (generated CA), a client certificate and a password: (host, port, pki, user, pw)."""
    exe = mosquitto_binary()
    passwd = shutil.which("mosquitto_passwd")
    if exe is None or passwd is None:
        pytest.skip("mosquitto (with mosquitto_passwd) is not installed")
    pki = make_pki(tmp_path / "pki")
    user, pw = "bridge", "s3cret-" + os.urandom(4).hex()
    pwfile = tmp_path / "passwd"
    subprocess.run([passwd, "-b", "-c", str(pwfile), user, pw], check=True, capture_output=True)
    port = free_port()
    conf = tmp_path / "mosquitto-tls.conf"
    # Run as this user: mosquitto started as root otherwise drops to user "mosquitto", which cannot read
    # the test's private tmp folder.
    import pwd

    me = pwd.getpwuid(os.geteuid()).pw_name
    conf.write_text(f"user {me}\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n"
                    f"cafile {pki['ca_cert']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
                    "require_certificate true\nmax_queued_messages 0\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {proc.stderr.read().decode()[:500]}")
            time.sleep(0.05)
    yield "127.0.0.1", port, pki, user, pw
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
