"""SSO (auth.oidc) against a real OpenID Connect provider: `oidc-provider-mock` (PyPI) run as a subprocess.

The provider requires client registration (so redirect URIs and client secrets are really checked) and a nonce.
The relying party (clawbot.chat.oidc.OidcLogin) is mounted in a small Starlette app served by uvicorn on loopback,
and a plain httpx client plays the browser: GET /auth/oidc/login, the provider's authorization form, the
callback. Each test runs its scenario in one event loop (app, relying party and browser together), the provider
is one process for the module, stopped by its pid at the end.

Note: oidc-provider-mock does not enforce PKCE (it registers no code-challenge extension), so PKCE is checked on
the wire: the authorization request carries an S256 challenge of the verifier that the token request sends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from clawbot.chat.oidc import COOKIE, Identity, OidcConfigError, OidcError, OidcLogin, choose_auth_method
from clawbot.common import pki

pytest.importorskip("oidc_provider_mock", reason="the test extra's oidc-provider-mock is not installed")

USERS = [
    {"sub": "u-alice-0001", "preferred_username": "alice", "email": "alice@example.com",
     "groups": ["staff", "clawbot-admins"]},
    {"sub": "u-bob-0002", "email": "bob@example.com", "groups": "staff"},         # no preferred_username
    {"sub": "u-carol-0003", "preferred_username": "carol", "groups": "clawbot-admins"},  # a string claim
    {"sub": "u-erin-0004"},                                                        # neither name nor email
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, what: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)  # poll interval of this deadline-bounded wait


@contextlib.contextmanager
def running_provider(log_path, command, scheme: str = "http", verify=True):
    """Start the provider command (a function of the port) on a free port; yield its base URL; stop it by pid."""
    for _attempt in range(3):  # the free port may be taken in between; then try another
        port = free_port()
        base = f"{scheme}://127.0.0.1:{port}"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)

        def up():
            try:
                return httpx.get(base + "/.well-known/openid-configuration", timeout=2, verify=verify).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, "oidc-provider-mock answers its discovery document", proc=proc)
        except AssertionError:
            _stop(proc)
            continue
        try:
            yield base
        finally:
            _stop(proc)
        return
    raise AssertionError(f"oidc-provider-mock did not start; its log:\n{log_path.read_text()[-3000:]}")


def provider_command(users: list[dict]):
    """oidc-provider-mock's CLI (registration and nonce required) on a port, knowing these users' claims."""
    def command(port):
        args = [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(port),
                "--require-registration", "true", "--require-nonce", "true"]
        for user in users:
            args += ["--user-claims", json.dumps(user)]
        return args
    return command


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    """Base URL of oidc-provider-mock run by its CLI (registration and nonce required), on plain http."""
    with running_provider(tmp_path_factory.mktemp("oidc") / "provider.log", provider_command(USERS)) as base:
        yield base


# oidc-provider-mock's CLI has no TLS option: the same app under uvicorn with a certificate (as the CLI runs it)
TLS_PROVIDER = """
import json, sys, uvicorn, oidc_provider_mock
users = [oidc_provider_mock.User(sub=u.pop("sub"), claims=u) for u in json.loads(sys.argv[4])]
app = oidc_provider_mock.app(require_client_registration=True, require_nonce=True, user_claims=users)
uvicorn.run(app, interface="wsgi", host="127.0.0.1", port=int(sys.argv[1]), ssl_certfile=sys.argv[2],
            ssl_keyfile=sys.argv[3], log_level="warning")
"""


@pytest.fixture(scope="module")
def tls_provider(tmp_path_factory):
    """(base URL, CA file) of oidc-provider-mock over https with a certificate of a CA made here."""
    directory = tmp_path_factory.mktemp("oidc-tls")
    ca_key, ca_cert = pki.create_ca("clawbot test IdP CA", permitted_dns=["localhost"], permitted_ips=["127.0.0.1"])
    key, cert = pki.issue_server_cert(ca_key, ca_cert, "idp", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    pki.write_certificate(directory / "ca.pem", ca_cert)
    pki.write_certificate(directory / "idp.pem", cert)
    pki.write_private_key(directory / "idp.key", key)
    ca_file = str(directory / "ca.pem")

    def command(port):
        return [sys.executable, "-c", TLS_PROVIDER, str(port), str(directory / "idp.pem"), str(directory / "idp.key"),
                json.dumps(USERS)]
    with running_provider(directory / "provider.log", command, "https",
                          verify=ssl.create_default_context(cafile=ca_file)) as base:
        yield base, ca_file


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def register(provider: str, redirect_uris: list[str], method: str = "client_secret_basic",
             verify=True) -> tuple[str, str]:
    response = httpx.post(provider + "/oauth2/clients", json={"redirect_uris": redirect_uris,
                                                              "token_endpoint_auth_method": method},
                          timeout=10, verify=verify)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["client_id"], body["client_secret"]


# ---------------------------------------------------------------------------------------------- app + browser

def make_app(holder: dict) -> Starlette:
    """What the chat service does, reduced: login → redirect, callback → identity (or the reason, 400)."""
    async def login(request):
        try:
            return await holder["login"].login_redirect(request)
        except OidcError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)

    async def callback(request):
        rp = holder["login"]
        try:
            identity = await rp.callback(request)
            response = JSONResponse(dataclasses.asdict(identity))
        except OidcError as exc:
            response = JSONResponse({"error": str(exc)}, status_code=400)
        rp.clear_cookie(response)
        return response

    async def mix_up(request):  # a "provider" that hands out the real provider's discovery document as its own
        async with httpx.AsyncClient() as http:
            document = await http.get(holder["provider"] + "/.well-known/openid-configuration")
        return JSONResponse(document.json())

    return Starlette(routes=[Route("/auth/oidc/login", login), Route("/auth/oidc/callback", callback),
                             Route("/mix-up/.well-known/openid-configuration", mix_up)])


class Browser:
    """A browser reduced to what the flow needs. Cookies are kept by hand: the binding cookie is `Secure`, which
    http.cookiejar (rightly) never sends over this test's plain-http loopback."""

    def __init__(self, app_base: str, verify=True):
        self.app_base = app_base
        self.http = httpx.AsyncClient(timeout=15, follow_redirects=False, verify=verify)
        self.cookie: str | None = None
        self.set_cookie: SimpleCookie | None = None

    async def start(self, headers: dict | None = None) -> str:
        response = await self.http.get(self.app_base + "/auth/oidc/login",
                                       headers={**self._cookies(), **(headers or {})})
        assert response.status_code == 302, response.text
        jar = SimpleCookie()
        for header in response.headers.get_list("set-cookie"):
            jar.load(header)
        self.set_cookie = jar
        self.cookie = jar[COOKIE].value
        return response.headers["location"]

    async def authorize(self, authorize_url: str, sub: str | None = None, deny: bool = False) -> str:
        form = await self.http.get(authorize_url)
        assert form.status_code == 200 and "Authorize" in form.text, form.text
        response = await self.http.post(authorize_url, data={"action": "deny"} if deny else {"sub": sub})
        assert response.status_code == 302, response.text
        return response.headers["location"]

    async def finish(self, callback_url: str, cookie: str | None = "mine") -> httpx.Response:
        headers = self._cookies() if cookie == "mine" else ({"Cookie": f"{COOKIE}={cookie}"} if cookie else {})
        return await self.http.get(callback_url, headers=headers)

    async def sign_in(self, sub: str) -> httpx.Response:
        return await self.finish(await self.authorize(await self.start(), sub))

    def _cookies(self) -> dict:
        return {"Cookie": f"{COOKIE}={self.cookie}"} if self.cookie else {}

    async def aclose(self):
        await self.http.aclose()


@contextlib.asynccontextmanager
async def served(holder: dict):
    """The app on a loopback port, in this event loop; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    server = uvicorn.Server(uvicorn.Config(make_app(holder), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise AssertionError("the test app did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 120))


@pytest.fixture
def rp_settings(provider, tmp_path):
    """(settings factory): auth.oidc for a client registered now, with its secret in a 0600 file."""
    def make(app_base: str, method: str = "client_secret_basic", **overrides) -> dict:
        redirect = app_base + "/auth/oidc/callback"
        default_redirect = "https://" + urlsplit(app_base).netloc + "/auth/oidc/callback"
        client_id, secret = register(provider, [redirect, default_redirect], method)
        secret_file = tmp_path / f"secret-{client_id}"
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
        settings = {"enabled": True, "issuer": provider, "client_id": client_id, "client_secret_file": str(secret_file),
                    "admin_values": ["clawbot-admins"], "redirect_url": redirect}
        settings.update(overrides)
        return settings
    return make


class Wire:
    """Token requests as sent (an httpx event hook on the relying party's OAuth client)."""

    def __init__(self, rp: OidcLogin):
        self.requests: list[httpx.Request] = []
        self.rp = rp

    async def attach(self):
        await self.rp.metadata()

        async def hook(request):
            self.requests.append(request)
        self.rp._oauth.event_hooks["request"].append(hook)


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


# ---------------------------------------------------------------------------------------------- the flow

def test_sign_in_gives_the_identity_with_pkce_nonce_and_a_bound_state(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            wire = Wire(rp)
            await wire.attach()
            browser = Browser(app)
            try:
                authorize_url = await browser.start()
                query = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
                assert authorize_url.startswith(provider + "/oauth2/authorize?")
                assert query["response_type"] == "code" and query["client_id"] == rp.client_id
                assert query["redirect_uri"] == app + "/auth/oidc/callback"
                assert query["scope"].split() == ["openid", "profile", "email"]
                assert query["code_challenge_method"] == "S256"
                assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
                pending = rp._pending[query["state"]]
                assert query["code_challenge"] == s256(pending.verifier) and query["nonce"] == pending.nonce

                morsel = browser.set_cookie[COOKIE]
                assert morsel["httponly"] and morsel["secure"] and morsel["samesite"].lower() == "lax"
                assert morsel["path"] == "/auth/oidc" and 0 < int(morsel["max-age"]) <= 600

                callback_url = await browser.authorize(authorize_url, "u-alice-0001")
                assert callback_url.startswith(app + "/auth/oidc/callback?")
                response = await browser.finish(callback_url)
                assert response.status_code == 200, response.text
                assert Identity(**response.json()) == Identity(
                    issuer=provider, subject="u-alice-0001", username="alice", email="alice@example.com",
                    is_admin=True)
                # the binding cookie is cleared on the way out
                assert any(h.startswith(f"{COOKIE}=") and "Max-Age=0" in h
                           for h in response.headers.get_list("set-cookie"))

                (token_request,) = wire.requests
                body = parse_qs(token_request.content.decode())
                assert body["grant_type"] == ["authorization_code"]
                assert body["code_verifier"] == [pending.verifier]
                assert body["redirect_uri"] == [app + "/auth/oidc/callback"]
                assert token_request.headers["authorization"].startswith("Basic ")  # client_secret_basic
                assert "client_secret" not in body
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


@pytest.mark.parametrize("sub,username,email,is_admin", [
    ("u-bob-0002", "bob@example.com", "bob@example.com", False),   # falls back to email; "staff" is no admin
    ("u-carol-0003", "carol", "", True),                           # admin by a string claim
    ("u-erin-0004", "u-erin-0004", "", False),                     # falls back to sub
])
def test_username_fallbacks_and_admin_claim(provider, rp_settings, sub, username, email, is_admin):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            browser = Browser(app)
            try:
                response = await browser.sign_in(sub)
                assert response.status_code == 200, response.text
                assert response.json() == {"issuer": provider, "subject": sub, "username": username, "email": email,
                                           "is_admin": is_admin}
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_no_admin_without_admin_values_and_a_custom_claims_mapping(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app, admin_values=[], username_claim="email"))
            browser = Browser(app)
            try:
                response = await browser.sign_in("u-alice-0001")
                assert response.json()["username"] == "alice@example.com" and response.json()["is_admin"] is False
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_client_secret_post_and_public_client(provider, rp_settings, tmp_path):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            # a provider that lists only client_secret_post (oidc-provider-mock lists no methods: basic is implied)
            rp = holder["login"] = OidcLogin(rp_settings(app, "client_secret_post"))
            wire = Wire(rp)
            await wire.attach()
            rp._metadata["token_endpoint_auth_methods_supported"] = ["client_secret_post"]
            browser = Browser(app)
            try:
                response = await browser.sign_in("u-carol-0003")
                assert response.status_code == 200, response.text
                body = parse_qs(wire.requests[-1].content.decode())
                assert body["client_secret"] and body["client_id"] == [rp.client_id]
                assert "authorization" not in wire.requests[-1].headers
            finally:
                await browser.aclose()
                await rp.aclose()

            # no secret file (deploy writes none when clawbot_oidc_client_secret is empty): a public client, PKCE
            # only (auth method "none"). oidc-provider-mock accepts confidential clients only, so it refuses; what
            # is checked is the request (client_id, no secret) and that the refusal reaches the user with its reason.
            rp = holder["login"] = OidcLogin(rp_settings(app, "none", client_secret_file=str(tmp_path / "absent")))
            wire = Wire(rp)
            await wire.attach()
            browser = Browser(app)
            try:
                response = await browser.sign_in("u-carol-0003")
                assert response.status_code == 400
                assert "refused the sign-in code: invalid_client" in response.json()["error"], response.text
                body = parse_qs(wire.requests[-1].content.decode())
                assert "code_verifier" in body
                assert body["client_id"] == [rp.client_id] and "client_secret" not in body
                assert "authorization" not in wire.requests[-1].headers
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_redirect_uri_defaults_to_https_on_the_request_host(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app, redirect_url=""))
            browser = Browser(app)
            try:
                authorize_url = await browser.start()
                query = parse_qs(urlsplit(authorize_url).query)
                assert query["redirect_uri"] == [f"https://{urlsplit(app).netloc}/auth/oidc/callback"]
                assert browser.set_cookie[COOKIE]["path"] == "/auth/oidc"
                bad = await browser.http.get(app + "/auth/oidc/login", headers={"Host": "evil/path?x"})
                assert bad.status_code == 502 and "Host" in bad.json()["error"]
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_https_provider_verified_with_ca_file(tls_provider, tmp_path):
    base, ca_file = tls_provider
    trust = ssl.create_default_context(cafile=ca_file)

    async def scenario():
        holder = {}
        async with served(holder) as app:
            client_id, secret = register(base, [app + "/auth/oidc/callback"], verify=trust)
            (tmp_path / "secret").write_text(secret + "\n")  # a trailing newline (hand-written file) is tolerated
            settings = {"enabled": True, "issuer": base, "client_id": client_id,
                        "client_secret_file": str(tmp_path / "secret"), "admin_values": ["clawbot-admins"],
                        "redirect_url": app + "/auth/oidc/callback"}
            rp = holder["login"] = OidcLogin(settings, ca_file=ca_file)
            browser = Browser(app, verify=trust)
            try:
                response = await browser.sign_in("u-alice-0001")
                assert response.status_code == 200, response.text
                assert response.json()["issuer"] == base and response.json()["is_admin"] is True
            finally:
                await browser.aclose()
                await rp.aclose()

            rp = holder["login"] = OidcLogin(settings)  # the system trust store does not know this CA
            browser = Browser(app, verify=trust)
            try:
                response = await browser.http.get(app + "/auth/oidc/login")
                assert response.status_code == 502
                assert "cannot reach the identity provider" in response.json()["error"]
                assert "CERTIFICATE_VERIFY_FAILED" in response.json()["error"].upper().replace(" ", "_")
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


# ---------------------------------------------------------------------------------------------- refusals

def with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_wrong_replayed_foreign_and_expired_states_are_refused(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            browser, thief = Browser(app), Browser(app)
            try:
                callback_url = await browser.authorize(await browser.start(), "u-alice-0001")

                wrong = await browser.finish(with_query(callback_url, state=secrets.token_urlsafe(32)))
                assert wrong.status_code == 400 and "expired or was already used" in wrong.json()["error"]
                missing = await browser.finish(with_query(callback_url, state=None))
                assert missing.status_code == 400 and "no state" in missing.json()["error"]

                # the state (and code) seen elsewhere: refused without this browser's cookie, and not spoiled
                for cookie in (None, secrets.token_urlsafe(32)):
                    stolen = await thief.finish(callback_url, cookie=cookie)
                    assert stolen.status_code == 400 and "another browser" in stolen.json()["error"]

                ok = await browser.finish(callback_url)
                assert ok.status_code == 200 and ok.json()["username"] == "alice"

                replay = await browser.finish(callback_url)
                assert replay.status_code == 400 and "expired or was already used" in replay.json()["error"]

                # a sign-in left pending longer than STATE_TTL_S
                late_url = await browser.authorize(await browser.start(), "u-alice-0001")
                real_clock = rp.clock
                rp.clock = lambda: real_clock() + rp.STATE_TTL_S + 1
                late = await browser.finish(late_url)
                assert late.status_code == 400 and "expired" in late.json()["error"]
                rp.clock = real_clock

                # no code
                url = await browser.authorize(await browser.start(), "u-alice-0001")
                nocode = await browser.finish(with_query(url, code=None))
                assert nocode.status_code == 400 and "no authorization code" in nocode.json()["error"]
            finally:
                await browser.aclose()
                await thief.aclose()
                await rp.aclose()
    run(scenario)


def test_tampered_code_wrong_secret_and_provider_error(provider, rp_settings, tmp_path):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            browser = Browser(app)
            try:
                url = await browser.authorize(await browser.start(), "u-alice-0001")
                code = parse_qs(urlsplit(url).query)["code"][0]
                tampered = await browser.finish(with_query(url, code=code[:-2] + ("xy" if code[-2:] != "xy" else "zw")))
                assert tampered.status_code == 400
                assert "refused the sign-in code: invalid_grant" in tampered.json()["error"]

                # the user presses Deny at the provider (oidc-provider-mock's error redirect carries no state)
                url = await browser.authorize(await browser.start(), deny=True)
                assert "error=access_denied" in url
                denied = await browser.finish(url)
                assert denied.status_code == 400
                assert "did not sign you in: access_denied" in denied.json()["error"]

                # an error redirect with its state (as the spec has it) also ends that sign-in: its code is void
                authorize_url = await browser.start()
                state = parse_qs(urlsplit(authorize_url).query)["state"][0]
                url = await browser.authorize(authorize_url, "u-alice-0001")
                error_url = app + "/auth/oidc/callback?" + urlencode(
                    {"error": "login_required", "error_description": "Session\x00 expired <b>", "state": state})
                refused = await browser.finish(error_url)
                assert refused.status_code == 400
                assert refused.json()["error"] == ("the identity provider did not sign you in: login_required "
                                                   "(Session  expired <b>)")
                again = await browser.finish(url)
                assert again.status_code == 400 and "already used" in again.json()["error"]
            finally:
                await browser.aclose()
                await rp.aclose()

            settings = rp_settings(app)
            with open(settings["client_secret_file"], "w") as handle:
                handle.write("not-the-secret")
            rp = holder["login"] = OidcLogin(settings)
            browser = Browser(app)
            try:
                response = await browser.sign_in("u-alice-0001")
                assert response.status_code == 400
                assert "refused the sign-in code: invalid_client" in response.json()["error"]
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_id_token_checks(provider, rp_settings):
    """Signature, audience and nonce of real ID tokens from the provider, each broken in turn."""
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            seen = []
            validate = rp.validate_id_token

            async def spy(id_token, nonce):
                seen.append((id_token, nonce))
                return await validate(id_token, nonce)
            rp.validate_id_token = spy
            browser = Browser(app)
            other = OidcLogin(rp_settings(app))
            try:
                assert (await browser.sign_in("u-alice-0001")).status_code == 200
                id_token, nonce = seen[0]
                claims = await validate(id_token, nonce)
                assert claims["sub"] == "u-alice-0001" and claims["aud"] in (rp.client_id, [rp.client_id])

                with pytest.raises(OidcError, match="nonce does not match"):
                    await validate(id_token, "another-nonce")

                header, payload, signature = id_token.split(".")
                forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                forged["sub"] = "u-carol-0003"
                forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
                with pytest.raises(OidcError, match="ID token is not valid"):
                    await validate(f"{header}.{forged_payload}.{signature}", nonce)
                unsigned = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
                with pytest.raises(OidcError, match="ID token is not valid"):
                    await validate(f"{unsigned}.{payload}.", nonce)

                with pytest.raises(OidcError, match="another client"):  # a token made for another client
                    await other.validate_id_token(id_token, nonce)
            finally:
                await browser.aclose()
                await rp.aclose()
                await other.aclose()
    run(scenario)


def test_pending_sign_ins_are_bounded(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            rp = holder["login"] = OidcLogin(rp_settings(app))
            rp.MAX_PENDING = 3
            browser = Browser(app)
            try:
                urls = [await browser.start() for _ in range(5)]
                assert len(rp._pending) == 3
                first = await browser.authorize(urls[0], "u-alice-0001")
                assert "expired or was already used" in (await browser.finish(first)).json()["error"]
                last = await browser.authorize(urls[-1], "u-alice-0001")  # one browser, several tabs: all fine
                assert (await browser.finish(last)).status_code == 200
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_unreachable_or_wrong_provider(provider, rp_settings):
    async def scenario():
        holder = {}
        async with served(holder) as app:
            settings = rp_settings(app)
            for issuer, reason in ((f"http://127.0.0.1:{free_port()}", "cannot reach the identity provider"),
                                   (provider + "/realms/none", "answered 404")):
                rp = holder["login"] = OidcLogin({**settings, "issuer": issuer})
                browser = Browser(app)
                try:
                    response = await browser.http.get(app + "/auth/oidc/login")
                    assert response.status_code == 502 and reason in response.json()["error"]
                finally:
                    await browser.aclose()
                    await rp.aclose()
            # another issuer's document served as this one's (a mix-up): refused before any redirect
            holder["provider"] = provider
            rp = holder["login"] = OidcLogin({**settings, "issuer": app + "/mix-up"})
            browser = Browser(app)
            try:
                response = await browser.http.get(app + "/auth/oidc/login")
                assert response.status_code == 502 and "names issuer" in response.json()["error"], response.text
            finally:
                await browser.aclose()
                await rp.aclose()
    run(scenario)


def test_configuration_is_checked():
    with pytest.raises(OidcConfigError, match="issuer and client_id"):
        OidcLogin({"enabled": True, "client_id": "clawbot"})
    with pytest.raises(OidcConfigError, match="https"):
        OidcLogin({"issuer": "http://sso.example.internal", "client_id": "clawbot"})
    with pytest.raises(OidcConfigError, match="openid"):
        OidcLogin({"issuer": "https://sso.example.internal", "client_id": "clawbot", "scopes": ["profile"]})
    assert choose_auth_method(False, {}) == "none"
    assert choose_auth_method(True, {}) == "client_secret_basic"
    assert choose_auth_method(True, {"token_endpoint_auth_methods_supported": ["client_secret_post"]}) \
        == "client_secret_post"
    with pytest.raises(OidcError, match="neither"):
        choose_auth_method(True, {"token_endpoint_auth_methods_supported": ["private_key_jwt"]})
