"""Single sign-on with OpenID Connect: the authorization code flow with PKCE (S256), for the chat node.

`OidcLogin` is the whole relying party; the app mounts two routes on it:

- GET /auth/oidc/login → `login_redirect(request)`: a 302 to the provider's authorization endpoint (read from
  the issuer's /.well-known/openid-configuration, cached) with a fresh `state`, `nonce` and PKCE challenge. What
  the callback needs (code verifier, nonce, redirect URI) stays here, in memory, keyed by the state (bounded,
  expiring after `STATE_TTL_S`); the state is also bound to the browser with a short-lived cookie (HttpOnly,
  Secure, SameSite=Lax: the callback is a top-level navigation from the provider's site), so a state value seen
  elsewhere (a log, a proxy, a shoulder) cannot be completed from another browser. A state completes once.
- GET /auth/oidc/callback → `callback(request)` → `Identity`, or `OidcError` with a reason fit to show the user.
  The code is exchanged with the verifier through Authlib's httpx client (client_secret_basic or
  client_secret_post, whichever the provider lists; `none`, a public client protected by PKCE alone, when there is
  no client secret), and the ID token is checked with joserfc: signature by a key of the provider's JWKS (fetched
  again once when a key is unknown, for key rotation), `iss`, `aud` (and `azp`), `exp`/`iat`/`nbf`, `nonce`.

No cryptography is written here: random values come from `secrets`, PKCE from Authlib, JWS from joserfc.
Provisioning accounts and sessions is the caller's (clawbot.chat.accounts): an identity is (issuer, subject);
`username` is only the name proposed for a new account.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError, MissingClaimError
from joserfc.jwk import KeySet
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

import authlib.deprecate  # noqa: F401,E402  (it installs its warning filter first; ours goes in front of it)

with warnings.catch_warnings():
    # Authlib >= 1.7 prefers the `httpx2` distribution and warns when it falls back to httpx, which is what this
    # project uses (and what the integration is written for).
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

log = logging.getLogger("clawbot.chat.oidc")

DEFAULTS = {
    "enabled": False,
    "issuer": "",
    "client_id": "",
    "client_secret_file": "/etc/clawbot/oidc-client-secret",
    "scopes": ["openid", "profile", "email"],
    "username_claim": "preferred_username",
    "admin_claim": "groups",
    "admin_values": [],
    "redirect_url": "",
}
CALLBACK_PATH = "/auth/oidc/callback"
COOKIE = "clawbot_oidc"

# Signature algorithms accepted for ID tokens: asymmetric ones only (keys from the provider's JWKS). HS256 (signed
# with the client secret) and "none" are refused.
ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class OidcError(Exception):
    """A failed sign-in; str(error) says why in words a user can act on (no secrets in it)."""


class OidcConfigError(ValueError):
    """auth.oidc cannot work as configured (raised when OidcLogin is built)."""


@dataclass(frozen=True)
class Identity:
    """What the provider vouched for. (issuer, subject) identifies the person; the rest may change."""

    issuer: str
    subject: str
    username: str
    email: str
    is_admin: bool


@dataclass
class _Pending:
    verifier: str
    nonce: str
    redirect_uri: str
    browser: str
    created: float


def _is_loopback_http(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _short(text: object, limit: int = 200) -> str:
    """Provider-supplied text, made safe to show: printable, one line, bounded."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in str(text)).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def choose_auth_method(has_secret: bool, metadata: dict) -> str:
    """The token endpoint's client authentication: basic preferred, then post (OIDC Discovery's default is basic)."""
    if not has_secret:
        return "none"
    supported = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    for method in ("client_secret_basic", "client_secret_post"):
        if method in supported:
            return method
    raise OidcError("the identity provider supports neither client_secret_basic nor client_secret_post at its token "
                    f"endpoint (it lists {', '.join(map(str, supported))}); ask its administrator")


class OidcLogin:
    """The relying party for one provider (settings: clawbot.json auth.oidc, defaults as in the schema)."""

    STATE_TTL_S = 600.0
    MAX_PENDING = 4096
    DISCOVERY_TTL_S = 3600.0
    JWKS_MIN_REFRESH_S = 30.0
    LEEWAY_S = 60
    TIMEOUT_S = 10.0

    def __init__(self, settings: dict, ca_file: str | None = None):
        cfg = {**DEFAULTS, **(settings or {})}
        self.issuer = str(cfg["issuer"] or "").rstrip("/")
        self.client_id = str(cfg["client_id"] or "")
        if not self.issuer or not self.client_id:
            raise OidcConfigError("auth.oidc needs issuer and client_id")
        if not (self.issuer.startswith("https://") or _is_loopback_http(self.issuer)):
            raise OidcConfigError(f"auth.oidc.issuer must be an https:// URL, not {self.issuer!r}")
        self.scopes = list(cfg["scopes"] or DEFAULTS["scopes"])
        if "openid" not in self.scopes:
            raise OidcConfigError("auth.oidc.scopes must include openid")
        self.username_claim = str(cfg["username_claim"] or "preferred_username")
        self.admin_claim = str(cfg["admin_claim"] or "")
        self.admin_values = {str(v) for v in cfg["admin_values"] or ()}
        self.redirect_url = str(cfg["redirect_url"] or "")
        self.client_secret = self._read_secret(cfg["client_secret_file"])
        # ca_file: trust that CA (bundle) only; else the system's trust store (/etc/ssl/certs, where a company CA
        # is installed), not certifi's bundle that httpx would use by default.
        try:
            self._verify = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        except (OSError, ssl.SSLError) as exc:
            raise OidcConfigError(f"CA file for the identity provider {ca_file}: {exc}") from None
        self._http = httpx.AsyncClient(verify=self._verify, timeout=self.TIMEOUT_S, follow_redirects=False)
        self._oauth: AsyncOAuth2Client | None = None
        self._metadata: dict | None = None
        self._metadata_at = 0.0
        self._jwks: KeySet | None = None
        self._jwks_at = 0.0
        self._lock = asyncio.Lock()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self.clock = time.monotonic  # tests move it

    @staticmethod
    def _read_secret(path: str | None) -> str:
        if not path:
            return ""
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip("\r\n")
        except FileNotFoundError:
            log.info("SSO: no client secret at %s: acting as a public client (PKCE only)", path)
            return ""
        except OSError as exc:
            raise OidcConfigError(f"auth.oidc.client_secret_file {path}: {exc.strerror}") from None

    # ------------------------------------------------------------------ provider metadata and keys

    async def _get_json(self, url: str, what: str) -> dict:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OidcError(f"cannot reach the identity provider at {self.issuer} ({what}): "
                            f"{_short(exc) or type(exc).__name__}") from None
        if response.status_code != 200:
            raise OidcError(f"the identity provider answered {response.status_code} for its {what} ({url})")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise OidcError(f"the identity provider's {what} ({url}) is not a JSON object")
        return body

    async def metadata(self) -> dict:
        """The provider's discovery document (cached for DISCOVERY_TTL_S)."""
        if self._metadata is not None and self.clock() - self._metadata_at < self.DISCOVERY_TTL_S:
            return self._metadata
        async with self._lock:
            if self._metadata is not None and self.clock() - self._metadata_at < self.DISCOVERY_TTL_S:
                return self._metadata
            url = self.issuer + "/.well-known/openid-configuration"
            meta = await self._get_json(url, "discovery document")
            if str(meta.get("issuer", "")).rstrip("/") != self.issuer:
                named = _short(meta.get("issuer"))
                raise OidcError(f"the identity provider's discovery document names issuer {named!r}, "
                                f"not the configured {self.issuer!r} (auth.oidc.issuer)")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = meta.get(key)
                if not isinstance(value, str) or not (value.startswith("https://") or _is_loopback_http(value)):
                    raise OidcError(f"the identity provider's discovery document has no usable {key} "
                                    f"(an https:// URL is needed)")
            if "code" not in (meta.get("response_types_supported") or ["code"]):
                raise OidcError("the identity provider does not offer the authorization code flow")
            choose_auth_method(bool(self.client_secret), meta)  # refuse a provider this client cannot talk to
            if self._oauth is None:
                self._oauth = AsyncOAuth2Client(
                    client_id=self.client_id, client_secret=self.client_secret or None,
                    scope=" ".join(self.scopes), code_challenge_method="S256",
                    verify=self._verify, timeout=self.TIMEOUT_S)
            if self._metadata is None or meta.get("jwks_uri") != self._metadata.get("jwks_uri"):
                self._jwks = None
            self._metadata, self._metadata_at = meta, self.clock()
            return meta

    async def _keys(self, refresh: bool = False) -> KeySet:
        meta = await self.metadata()
        if self._jwks is None or refresh:
            body = await self._get_json(meta["jwks_uri"], "signing keys (JWKS)")
            try:
                self._jwks = KeySet.import_key_set(body)
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise OidcError(f"the identity provider's signing keys cannot be read: {_short(exc)}") from None
            self._jwks_at = self.clock()
        return self._jwks

    # ------------------------------------------------------------------ pending sign-ins

    def _store(self, state: str, pending: _Pending) -> None:
        now = self.clock()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if now - oldest.created < self.STATE_TTL_S and len(self._pending) < self.MAX_PENDING:
                break
            self._pending.popitem(last=False)
        self._pending[state] = pending

    def redirect_uri_for(self, request: Request) -> str:
        if self.redirect_url:
            return self.redirect_url
        host = request.headers.get("host", "")
        if not _HOST.match(host):
            raise OidcError("the request has no usable Host header to build the SSO redirect URI from "
                            "(set auth.oidc.redirect_url)")
        return f"https://{host}{CALLBACK_PATH}"

    def _cookie_path(self, redirect_uri: str) -> str:
        path = urlsplit(redirect_uri).path
        return path.rsplit("/", 1)[0] or "/"

    async def login_redirect(self, request: Request) -> Response:
        """302 to the provider's authorization endpoint; OidcError when the provider cannot be used."""
        meta = await self.metadata()
        redirect_uri = self.redirect_uri_for(request)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        browser = request.cookies.get(COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", browser):  # reuse it: sign-ins started in two tabs both work
            browser = secrets.token_urlsafe(32)
        assert self._oauth is not None
        url, _ = self._oauth.create_authorization_url(
            meta["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce,
            redirect_uri=redirect_uri, scope=" ".join(self.scopes))
        self._store(state, _Pending(verifier, nonce, redirect_uri, browser, self.clock()))
        response = RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
        response.set_cookie(COOKIE, browser, max_age=int(self.STATE_TTL_S), path=self._cookie_path(redirect_uri),
                            secure=True, httponly=True, samesite="lax")
        return response

    def clear_cookie(self, response: Response) -> None:
        """Remove the browser-binding cookie (call on the callback's response, success or failure)."""
        path = self._cookie_path(self.redirect_url or CALLBACK_PATH)
        response.delete_cookie(COOKIE, path=path, secure=True, httponly=True, samesite="lax")

    def _take(self, request: Request, state: str) -> _Pending:
        """The pending sign-in of `state` if this browser started it; it cannot be completed again."""
        pending = self._pending.get(state)
        if pending is None or self.clock() - pending.created >= self.STATE_TTL_S:
            self._pending.pop(state, None)
            raise OidcError("this sign-in has expired or was already used; start the sign-in again")
        if not hmac.compare_digest(request.cookies.get(COOKIE, "").encode("utf-8", "replace"), pending.browser.encode()):
            # left in place: whoever replays a stolen state must not be able to spoil the real browser's sign-in
            log.warning("SSO callback with a known state but without its browser cookie from %s",
                        request.client.host if request.client else "unknown")
            raise OidcError("this sign-in was started in another browser, or its cookie is missing (cookies must be "
                            "allowed for this site); start the sign-in again in this browser")
        del self._pending[state]
        return pending

    # ------------------------------------------------------------------ the callback

    async def callback(self, request: Request) -> Identity:
        params = request.query_params
        state = params.get("state") or ""
        if params.get("error"):
            if state:
                try:
                    self._take(request, state)  # finish it: the same state cannot be used afterwards
                except OidcError:
                    pass
            reason = _short(params["error"], 80)
            description = _short(params.get("error_description", ""))
            raise OidcError(f"the identity provider did not sign you in: {reason}"
                            + (f" ({description})" if description else ""))
        if not state:
            raise OidcError("the sign-in response carries no state; start the sign-in again")
        pending = self._take(request, state)
        code = params.get("code") or ""
        if not code:
            raise OidcError("the identity provider sent no authorization code; start the sign-in again")
        meta = await self.metadata()
        assert self._oauth is not None
        auth = self._oauth.client_auth(choose_auth_method(bool(self.client_secret), meta))
        try:
            token = await self._oauth.fetch_token(
                meta["token_endpoint"], grant_type="authorization_code", code=code,
                redirect_uri=pending.redirect_uri, code_verifier=pending.verifier, auth=auth)
        except OAuthError as exc:
            detail = _short(getattr(exc, "error", "") or "error")
            description = _short(getattr(exc, "description", "") or "")
            raise OidcError(f"the identity provider refused the sign-in code: {detail}"
                            + (f" ({description})" if description else "")) from None
        except httpx.HTTPError as exc:
            raise OidcError(f"cannot reach the identity provider at {self.issuer} (token endpoint): "
                            f"{_short(exc) or type(exc).__name__}") from None
        except ValueError as exc:  # not JSON
            raise OidcError(f"the identity provider's token response cannot be read: {_short(exc)}") from None
        id_token = token.get("id_token") if isinstance(token, dict) else None
        if not isinstance(id_token, str) or not id_token:
            raise OidcError("the identity provider returned no ID token (is the openid scope allowed for this client?)")
        claims = await self.validate_id_token(id_token, pending.nonce)
        identity = self.identity(claims)
        log.info("SSO: %s (subject %s at %s) signed in%s", identity.username, identity.subject, identity.issuer,
                 " as admin" if identity.is_admin else "")
        return identity

    async def validate_id_token(self, id_token: str, nonce: str) -> dict:
        """The ID token's claims once its signature, issuer, audience, times and nonce hold; OidcError otherwise."""
        meta = await self.metadata()
        offered = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [alg for alg in offered if alg in ASYMMETRIC_ALGS] or ["RS256"]
        keys = await self._keys()
        try:
            token = jwt.decode(id_token, keys, algorithms=algorithms)
        except (JoseError, ValueError) as exc:
            if self.clock() - self._jwks_at < self.JWKS_MIN_REFRESH_S:
                raise OidcError(f"the ID token is not valid: {_short(exc) or type(exc).__name__}") from None
            keys = await self._keys(refresh=True)  # the provider may have rotated its keys
            try:
                token = jwt.decode(id_token, keys, algorithms=algorithms)
            except (JoseError, ValueError) as exc2:
                raise OidcError(f"the ID token is not valid: {_short(exc2) or type(exc2).__name__}") from None
        claims = token.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=self.LEEWAY_S, iss={"essential": True, "value": meta["issuer"]}, sub={"essential": True},
            aud={"essential": True}, exp={"essential": True}, iat={"essential": True})
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise OidcError("the ID token has expired (is this machine's clock right?)") from None
        except MissingClaimError as exc:
            raise OidcError(f"the ID token lacks a required claim: {_short(exc)}") from None
        except JoseError as exc:
            raise OidcError(f"the ID token is not valid: {_short(exc)}") from None
        audience = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if self.client_id not in audience:
            raise OidcError("the ID token was issued for another client (aud), not this one")
        if ("azp" in claims or len(audience) > 1) and claims.get("azp") != self.client_id:
            raise OidcError("the ID token was issued for another client (azp), not this one")
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"].encode("utf-8", "replace"),
                                                                               nonce.encode()):
            raise OidcError("the ID token's nonce does not match this sign-in; start the sign-in again")
        return claims

    def identity(self, claims: dict) -> Identity:
        subject = str(claims["sub"])
        email = claims.get("email") if isinstance(claims.get("email"), str) else ""
        username = claims.get(self.username_claim)
        if not isinstance(username, str) or not username.strip():
            username = email or subject
        is_admin = False
        if self.admin_claim and self.admin_values:
            value = claims.get(self.admin_claim)
            if isinstance(value, str):
                is_admin = value in self.admin_values
            elif isinstance(value, list):
                is_admin = any(isinstance(v, str) and v in self.admin_values for v in value)
        return Identity(issuer=str(claims["iss"]), subject=subject, username=username.strip(), email=email,
                        is_admin=is_admin)

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._oauth is not None:
            await self._oauth.aclose()
