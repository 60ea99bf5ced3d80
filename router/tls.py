"""TLS on the public ports, from :class:`~router.config.RouterConfig`'s three file keys.

``tls_cert_file`` + ``tls_key_file`` turn TLS on for gRPC and HTTP alike;
``tls_client_ca_file`` also requires every client to present a certificate signed by that
CA (mutual TLS). Without them both ports are plaintext.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from router.config import RouterConfig


def grpc_server_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    key = Path(config.tls_key_file).read_bytes()
    cert = Path(config.tls_cert_file).read_bytes()
    ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def uvicorn_ssl_options(config: RouterConfig) -> dict[str, Any]:
    """``uvicorn.Config`` keywords: none without TLS."""
    if config.tls_cert_file is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
    }
    if config.tls_client_ca_file is not None:
        options["ssl_ca_certs"] = config.tls_client_ca_file
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options
