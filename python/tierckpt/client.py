"""The local control protocol of `tierckptd` over its Unix socket.

One frame is a big-endian u32 length and that many bytes of JSON. A request is
an object tagged by `op` (`{"op": "reserve", ...}`); a reply is a serde
`Result`: `{"Ok": "done"}`, `{"Ok": {"reserved": {...}}}` or
`{"Err": {"kind": ..., "message": ...}}`. Reservations and leases belong to
the connection: if it drops before `seal`, the daemon reclaims the segment.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading

from .errors import TierckptError, UnauthorizedError, UnavailableError, from_wire

DEFAULT_SOCKET = "/dev/shm/tierckpt/daemon.sock"
MAX_FRAME = 16 << 20


def default_socket() -> str:
    return os.environ.get("TIERCKPT_SOCKET") or DEFAULT_SOCKET


def check_daemon(s: socket.socket, path: str) -> None:
    """Refuses a socket served by neither root, this user, nor $TIERCKPT_DAEMON_UID: anyone can bind a
    socket where a daemon is expected, so nothing is sent before this check."""
    ucred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", ucred)
    me = os.geteuid()
    expected = os.environ.get("TIERCKPT_DAEMON_UID", "").strip()
    if uid in (0, me) or (expected.isdigit() and uid == int(expected)):
        return
    raise UnauthorizedError(
        f"the process serving {path} runs as uid {uid}, neither root nor this user (uid {me}): it may be an "
        f"impostor; nothing was sent. If the daemon runs as that user on purpose, set TIERCKPT_DAEMON_UID={uid}")


class Client:
    """One connection to a node daemon. Threads may share it: requests take turns (one lock), so a
    reservation made by one thread can be sealed by another on the same connection. After a lost
    connection the next request reconnects; `generation` counts the connections made."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = None):
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self.generation = 0
        self._connect()

    # -- connection ---------------------------------------------------------
    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise UnavailableError(
                f"no tierckpt daemon answers on {self.socket_path} ({e.strerror}); start one with "
                f"`tierckptd --socket {self.socket_path}` (or `tierckpt run -- <your command>`), "
                f"or set TIERCKPT_SOCKET to the socket of a running daemon") from None
        except OSError as e:
            s.close()
            raise UnavailableError(f"cannot connect to the tierckpt daemon at {self.socket_path}: {e}") from None
        try:
            check_daemon(s, self.socket_path)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self.generation += 1

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("the daemon closed the connection")
            got += k
        return bytes(buf)

    def request(self, req: dict):
        """Sends one request; returns `(reply_name, body)` or raises the mapped error."""
        body = json.dumps(req, separators=(",", ":"), allow_nan=False).encode()
        if len(body) > MAX_FRAME:
            raise ValueError(f"request of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                self._sock.sendall(struct.pack(">I", len(body)) + body)
                (n,) = struct.unpack(">I", self._recv_exact(4))
                if n > MAX_FRAME:
                    raise TierckptError(f"reply frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
                reply = json.loads(self._recv_exact(n))
            except (OSError, ConnectionError) as e:
                self.close()
                raise UnavailableError(
                    f"lost the connection to the tierckpt daemon at {self.socket_path} during "
                    f"{req.get('op')!r}: {e}") from None
        if "Err" in reply:
            raise from_wire(reply["Err"])
        ok = reply.get("Ok")
        if isinstance(ok, str):
            return ok, None
        if isinstance(ok, dict) and len(ok) == 1:
            ((name, val),) = ok.items()
            return name, val
        raise TierckptError(f"unexpected reply from the daemon: {reply!r}")

    def _expect(self, req: dict, name: str):
        got, body = self.request(req)
        if got != name:
            raise TierckptError(f"{req['op']}: expected a {name!r} reply, got {got!r}: {body!r}")
        return body

    # -- operations ---------------------------------------------------------
    def reserve(self, namespace: str, step: int, rank: int, world_size: int, length: int,
                segment: str | None = None) -> dict:
        """A segment of exactly `length` bytes: `{"id", "path", "len"}`; from `segment` (as
        `prepare` named it) when it is still free and large enough."""
        req = {"op": "reserve", "namespace": namespace, "step": int(step),
               "rank": int(rank), "world_size": int(world_size), "len": int(length)}
        if segment is not None:
            req["segment"] = str(segment)
        return self._expect(req, "reserved")

    def prepare(self, length: int) -> dict:
        """Sets a free segment of at least `length` bytes aside for a coming `reserve`, to map and
        fault in beforehand: `{"path", "len"}`."""
        return self._expect({"op": "prepare", "len": int(length)}, "prepared")

    def seal(self, reservation_id: int, wait: bool) -> None:
        self._expect({"op": "seal", "id": int(reservation_id), "wait": bool(wait)}, "done")

    def abort(self, reservation_id: int) -> None:
        self._expect({"op": "abort", "id": int(reservation_id)}, "done")

    def wait_visible(self, namespace: str, step: int, rank: int, timeout_ms: int = 600_000) -> None:
        self._expect({"op": "wait_visible", "namespace": namespace, "step": int(step),
                      "rank": int(rank), "timeout_ms": int(timeout_ms)}, "done")

    def open(self, namespace: str, step: int, rank: int) -> dict:
        """Leases a visible shard: `{"path", "manifest"}`."""
        return self._expect({"op": "open", "namespace": namespace, "step": int(step),
                             "rank": int(rank)}, "opened")

    def release(self, namespace: str, step: int, rank: int) -> None:
        self._expect({"op": "release", "namespace": namespace, "step": int(step),
                      "rank": int(rank)}, "done")

    def report_corrupt(self, namespace: str, step: int, rank: int) -> None:
        self._expect({"op": "report_corrupt", "namespace": namespace, "step": int(step),
                      "rank": int(rank)}, "done")

    def latest(self, namespace: str) -> int | None:
        return self._expect({"op": "latest", "namespace": namespace}, "latest")["step"]

    def list_namespaces(self) -> list:
        return self._expect({"op": "list_namespaces"}, "namespaces")["namespaces"]

    def list_steps(self, namespace: str) -> list:
        return self._expect({"op": "list_steps", "namespace": namespace}, "steps")["steps"]

    def delete_step(self, namespace: str, step: int) -> dict:
        return self._expect({"op": "delete_step", "namespace": namespace, "step": int(step)}, "deleted")

    def delete_namespace(self, namespace: str) -> dict:
        return self._expect({"op": "delete_namespace", "namespace": namespace}, "deleted")

    def discard_incomplete_after(self, namespace: str, step: int):
        return self.request({"op": "discard_incomplete_after", "namespace": namespace, "step": int(step)})[1]

    def status(self) -> dict:
        return self._expect({"op": "status"}, "status")

    def declare_complete(self, namespace: str, step: int) -> None:
        """Every rank of the job holds `step` visible: this node's retention counts it complete now."""
        self._expect({"op": "declare_complete", "namespace": namespace, "step": int(step)}, "done")

    def record_failure(self, namespace: str, kind: str, detail: str = "", step: int | None = None,
                       restart: int = 0, unix_ms: int | None = None) -> None:
        import time
        rec = {"unix_ms": int(unix_ms if unix_ms is not None else time.time() * 1000), "kind": kind,
               "detail": detail, "step": None if step is None else int(step), "restart": int(restart)}
        self._expect({"op": "record_failure", "namespace": namespace, "record": rec}, "done")

    def failures(self, namespace: str) -> list:
        """Failure records of a namespace (oldest first)."""
        body = self._expect({"op": "failures", "namespace": namespace}, "failures")
        if isinstance(body, dict):
            return list(body.get("records", []))
        return list(body or [])

    def advice(self, namespace: str) -> dict:
        """Whether to checkpoint at the next step boundary, and why: `{"save_now", "events": [{"id",
        "kind", "detail", "at_unix_ms"}], "preemption": {"deadline_unix_ms", "detail"}?,
        "drain_estimate_ms"?}`. Cheap (no I/O in the daemon): may be asked every step."""
        return self._expect({"op": "advice", "namespace": namespace}, "advice")

    # -- pinned and named steps (issue 19) -----------------------------------
    def pin(self, namespace: str, step: int, name: str | None = None, node_only: bool = False) -> dict:
        """Pins `step` (held in this node's memory or the persistent tier) on every tier that holds
        it, optionally naming it (a name on another step moves here): `{"pin": {"step", "names",
        "tiers"}, "not_reached": [...]}`. `node_only` pins this node's memory copy alone (nothing
        forwarded to the members or written to the store)."""
        req = {"op": "pin", "namespace": namespace, "step": int(step)}
        if name is not None:
            req["name"] = str(name)
        if node_only:
            req["node_only"] = True
        return self._expect(req, "pinned")

    def unpin(self, namespace: str, step: int | None = None, name: str | None = None) -> dict:
        """Unpins the step given by number or by name (exactly one): `{"pin", "not_reached"}`."""
        if (step is None) == (name is None):
            raise ValueError("unpin takes exactly one of step and name")
        req = {"op": "unpin", "namespace": namespace}
        if step is not None:
            req["step"] = int(step)
        else:
            req["name"] = str(name)
        return self._expect(req, "pinned")

    def pins(self, namespace: str) -> list:
        """The pinned steps of a namespace, oldest first: `[{"step", "names", "tiers"}]`."""
        return self._expect({"op": "pins", "namespace": namespace}, "pins")["pins"]
