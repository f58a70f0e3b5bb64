"""Shards are plain safetensors files for the reference Python package, both ways."""

import http.client
import json
import pathlib
import subprocess

import numpy as np
from safetensors.numpy import load, load_file, save

from conftest import binary, tierckpt


def request(daemon, method, path, body=None, token=None):
    """An HTTP exchange with the daemon, carrying its token unless `token` says which."""
    host, port = daemon["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {daemon['token'] if token is None else token}"}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_rust_client_shard_is_read_by_python_safetensors(daemon):
    n = 3_000_001
    wrote = subprocess.run([binary("tierckpt-test-writer"), "--socket", daemon["socket"], "--namespace", "py",
                            "--step", "4", "--bytes", str(n), "--seed", "9"], capture_output=True, text=True, check=False)
    assert wrote.returncode == 0, wrote.stderr
    out = pathlib.Path(daemon["dir"]) / "export"
    exported = tierckpt(daemon["socket"], "export", "py", "--format", "safetensors", str(out), "--json")
    assert exported.returncode == 0, exported.stderr
    files = json.loads(exported.stdout)["files"]
    tensors = load_file(files[0])
    expected = ((np.arange(n, dtype=np.uint64) * 131 + 9) % 256).astype(np.uint8)
    assert tensors["payload"].dtype == np.uint8
    assert np.array_equal(tensors["payload"], expected)


def test_python_safetensors_file_is_accepted_and_served_back(daemon):
    state = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "flags": np.array([True, False, True]),
    }
    blob = save(state, metadata={"epoch": "3"})
    status, body = request(daemon, "PUT", "/v1/shards/pyjob/7/0?world_size=1", blob)
    assert status == 201, body
    status, got = request(daemon, "GET", "/v1/shards/pyjob/7/0")
    assert status == 200
    back = load(got)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    inspect = tierckpt(daemon["socket"], "inspect", "pyjob", "--json")
    shard = json.loads(inspect.stdout)["shards"][0]
    assert shard["verified"] and shard["metadata"] == {"epoch": "3"}


def test_garbage_upload_is_refused_and_stores_nothing(daemon):
    status, body = request(daemon, "PUT", "/v1/shards/pyjob/1/0?world_size=1", b"\x00" * 64)
    assert status == 422, body
    assert "safetensors" in json.loads(body)["message"]
    status, body = request(daemon, "GET", "/v1/namespaces/pyjob/steps")
    assert json.loads(body)["steps"] == []


def test_http_needs_the_token(daemon):
    status, body = request(daemon, "GET", "/v1/namespaces", token="wrong")
    assert status == 401 and "bearer token" in json.loads(body)["message"]
    status, body = request(daemon, "PUT", "/v1/shards/pyjob/1/0?world_size=1", b"\x00" * 64, token="")
    assert status == 401, body
    assert request(daemon, "GET", "/v1/namespaces")[0] == 200
