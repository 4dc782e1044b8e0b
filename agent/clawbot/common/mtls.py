"""mTLS plumbing for the gateway: the peer certificate in the ASGI scope, and certificate rotation.

uvicorn verifies the client certificate (CERT_REQUIRED against the cluster CA) but does not put it in
the ASGI scope, so the app could not authorise a client by its SAN. PeerCertH11Protocol reads it from
the TLS transport once per connection and adds it as scope["extensions"]["tls"]["client_cert_der"]
(the shape of the ASGI TLS extension). CertWatcher polls the files' mtimes and swaps a rotated
certificate into the live SSLContext through pki.reload_cert_chain (scratch context first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from uvicorn.protocols.http.h11_impl import H11Protocol

from clawbot.common import pki

log = logging.getLogger("clawbot.common.mtls")


def _with_peer_cert(app, peer_der: bytes | None, tls_version: str | None):
    async def wrapped(scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            scope = dict(scope)
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {"client_cert_der": peer_der, "tls_version": tls_version}
            scope["extensions"] = extensions
        await app(scope, receive, send)

    return wrapped


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the verified client certificate (DER) in every request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        version = ssl_object.version() if ssl_object is not None else None
        self.app = _with_peer_cert(self.app, peer, version)


def peer_cert_der(scope) -> bytes | None:
    return ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_der")


class CertWatcher:
    """Poll the TLS files every `interval` s; on a change reload the live context (never break it)."""

    def __init__(self, context: ssl.SSLContext, tls: dict, interval: float = 5.0):
        self.context = context
        self.tls = tls
        self.interval = interval
        self._seen = self._stamp()
        self.last_error: str = ""
        self.reloads = 0
        self._task: asyncio.Task | None = None

    def _paths(self) -> tuple[str, str, str]:
        return self.tls["server_cert"], self.tls["server_key"], self.tls["ca_cert"]

    def _stamp(self):
        out = []
        for path in self._paths():
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def set_tls(self, tls: dict) -> None:
        """New paths from a reloaded config: check them on the next poll."""
        if tls != self.tls:
            self.tls = tls
            self._seen = None

    def check_now(self) -> bool:
        """Reload if anything changed; True when the live context now has new material."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        cert, key, ca = self._paths()
        try:
            pki.reload_cert_chain(self.context, cert, key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            # keep the old, working chain; try again when the files change once more
            self.last_error = f"rotated certificate {cert} / {key} not loaded, keeping the old one: {exc}"
            log.error("%s", self.last_error)
            self._seen = stamp
            return False
        if self._seen is not None and stamp[2] != self._seen[2]:
            try:
                # a CA bundle can only be added to: the old CA stays trusted until the agent restarts
                self.context.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as exc:
                log.error("new CA file %s not loaded: %s", ca, exc)
        self._seen = stamp
        self.last_error = ""
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", cert)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cert-watcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check_now()
            except Exception:  # never let the watcher die
                log.exception("certificate watcher failed")

    def summary(self) -> dict:
        """Certificate facts for /status: expiry of the files as they are now."""
        out = {"reloads": self.reloads, "last_error": self.last_error}
        for name in ("server_cert", "ca_cert"):
            try:
                out[name] = pki.cert_summary(pki.load_certificate(self.tls[name]))
            except (OSError, ValueError) as exc:
                out[name] = {"error": str(exc)}
        return out


def server_context(tls: dict) -> ssl.SSLContext:
    return pki.server_ssl_context(tls["server_cert"], tls["server_key"], tls["ca_cert"])
