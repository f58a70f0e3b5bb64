"""The Python client talks only to a daemon run by root or its own user."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tierckpt import Client
from tierckpt.errors import UnauthorizedError

IMPOSTOR = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        b = c.recv(1 << 16)
    except Exception:
        b = b""
    open(sys.argv[2], "ab").write(b)
    c.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="serving a socket as another user needs root (CI runs as root)")
def test_the_client_refuses_a_socket_served_by_another_user():
    d = tempfile.mkdtemp(prefix="tierckpt-py-impostor-", dir="/dev/shm")
    os.chmod(d, 0o777)
    sock, got = os.path.join(d, "daemon.sock"), os.path.join(d, "got")
    # The system's interpreter: another user may not be able to reach this one's virtual environment.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    p = subprocess.Popen([python, "-c", IMPOSTOR, sock, got], user=65534, group=65534, cwd="/",
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(UnauthorizedError, match="uid 65534"):
            Client(sock)
        # The impostor serves one connection at a time: once a probe's bytes are recorded, whatever the
        # refused client sent was recorded before them.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(sock)
            probe.sendall(b"probe")
        deadline = time.monotonic() + 20
        while not (os.path.exists(got) and open(got, "rb").read().endswith(b"probe")):
            assert time.monotonic() < deadline, "the impostor never recorded the probe"
            time.sleep(0.02)
        assert open(got, "rb").read() == b"probe", "a request reached the impostor"
    finally:
        p.kill()
        p.wait()
        subprocess.run(["rm", "-rf", d], check=False)


def test_the_client_talks_to_its_own_daemon(daemon):
    with Client(daemon["socket"]) as c:
        assert c.status()["pid"] > 0
