"""Kafka TLS and SASL: one ``ssl.SSLContext`` from ``kafka.security``, handed to every client.

    ssl_context(security)        the context (None for PLAINTEXT): verifies the broker against
                                 ``cafile`` (else the system CAs), presents ``certfile``/``keyfile``
                                 when given (mutual TLS), checks the host name unless told not to
    faust_credentials(security)  Faust's ``broker_credentials``: SSLCredentials, or SASLCredentials
                                 always *with* the SSL context (without one Faust would send the
                                 password in clear, PITFALLS 18)
    aiokafka_security(security)  the same settings as aiokafka keyword arguments, for the plain
                                 producers, consumers and admin clients of the commands

The config refuses SASL without TLS, so no path here can send a password in clear. Nothing
here logs or formats the password.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faust
from faust.types.auth import CredentialsT

from .config import KafkaSecurity
from .errors import ConfigError

__all__ = ["aiokafka_security", "faust_credentials", "ssl_context"]


def ssl_context(security: KafkaSecurity) -> ssl.SSLContext | None:
    """The TLS context for ``SSL`` and ``SASL_SSL``; None for ``PLAINTEXT``.

    A CA or key file that cannot be loaded is a ConfigError naming the key.
    """
    if security.protocol == "PLAINTEXT":
        return None
    with _loading("cafile"):
        context = ssl.create_default_context(cafile=security.cafile)
    context.check_hostname = security.check_hostname
    if security.certfile is not None:
        with _loading("certfile"):
            context.load_cert_chain(security.certfile, security.keyfile)
    return context


@contextmanager
def _loading(key: str) -> Iterator[None]:
    """Turn a file that cannot be read or parsed into a ConfigError naming ``key``."""
    try:
        yield
    except ssl.SSLError as exc:
        raise ConfigError(f"kafka.security.{key}", f"cannot load: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"kafka.security.{key}", f"cannot load: {exc.strerror}") from None


def faust_credentials(security: KafkaSecurity) -> CredentialsT | None:
    """Faust's ``broker_credentials`` for these settings (None for ``PLAINTEXT``)."""
    context = ssl_context(security)
    if context is None:
        return None
    if security.protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=security.username,
        password=security.password,
        ssl_context=context,
        mechanism=security.mechanism,
    )


def aiokafka_security(security: KafkaSecurity) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/Consumer/AdminClient/Client."""
    context = ssl_context(security)
    if context is None:
        return {"security_protocol": "PLAINTEXT"}
    options: dict[str, Any] = {"security_protocol": security.protocol, "ssl_context": context}
    if security.protocol == "SASL_SSL":
        options |= {
            "sasl_mechanism": security.mechanism,
            "sasl_plain_username": security.username,
            "sasl_plain_password": security.password,
        }
    return options
