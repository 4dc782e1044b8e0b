"""HTTP side of accounts: who a request is from (session cookie or API key), CSRF, and the account routes.

Every route outside the public list needs a credential; `authenticated` is the dependency that says who it is
(401 otherwise) and, for a cookie session, checks the CSRF token on every state-changing method (403). A bearer
API key needs no CSRF token: a browser never sends one on its own.

Routes: POST /api/login, POST /api/logout, GET /api/session, POST /api/password, GET|POST|DELETE /api/keys,
GET /api/usage, and for admins /api/admin/users[/NAME] and /api/admin/usage.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from clawbot.chat.accounts import AccountError, LoginFailed, Principal, Throttled
from clawbot.chat.store import NotFound

log = logging.getLogger("clawbot.chat.access")

COOKIE = "clawbot_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
UserName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$", description="account name")]


def runtime(request: Request):
    return request.app.state.clawbot["runtime"]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


NOT_SIGNED_IN = "not signed in: log in, or send an API key as 'Authorization: Bearer cb-…'"
# Everything else needs a credential before it is even routed (so not even a 404 tells which routes exist).
PUBLIC_PATHS = frozenset({"/", "/healthz", "/favicon.ico", "/api/login", "/api/auth/config",
                          "/auth/oidc/login", "/auth/oidc/callback"})
PUBLIC_PREFIXES = ("/static/",)
# What an API key may not do: manage keys, passwords, sessions or accounts. A leaked key is contained by revoking
# it; a key that could mint keys or guess its owner's password would not be.
KEY_REFUSED_PREFIXES = ("/api/keys", "/api/password", "/api/logout", "/api/admin/")


def needs_credential(request: Request) -> bool:
    path = request.scope["path"]  # what the router matches, not a URL rebuilt from the Host header
    return path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)


def principal_of(request: Request) -> Principal | None:
    accounts = runtime(request).accounts
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return accounts.key_principal(value.strip(), client_address(request))
    return accounts.session(request.cookies.get(COOKIE))


def authenticated(request: Request) -> Principal:
    """The caller (401 without a valid session or key); CSRF checked for cookie sessions (403)."""
    principal = getattr(request.state, "principal", None) or principal_of(request)
    if principal is None:
        raise HTTPException(401, NOT_SIGNED_IN, headers={"WWW-Authenticate": "Bearer"})
    if principal.via == "session" and request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "").encode("utf-8", "replace")
        if not sent or not secrets.compare_digest(sent, principal.session["csrf_token"].encode()):
            raise HTTPException(403, f"missing or wrong CSRF token: send the session's csrf_token as {CSRF_HEADER}")
    if principal.via == "key" and request.method not in SAFE_METHODS and request.scope["path"].startswith(
            KEY_REFUSED_PREFIXES):
        raise HTTPException(403, "an API key cannot manage keys, passwords or accounts: sign in to do that")
    request.state.principal = principal
    return principal


def admin(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin account")
    return principal


Caller = Annotated[Principal, Depends(authenticated)]
Admin = Annotated[Principal, Depends(admin)]


def set_session_cookie(response: Response, token: str, max_age_s: int) -> None:
    response.set_cookie(COOKIE, token, max_age=max_age_s, path="/", secure=True, httponly=True, samesite="strict")


def same_origin(request: Request) -> bool:
    """A login may not be posted from another site's page (login CSRF): Origin, when sent, names this host."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


# ------------------------------------------------------------------------------------------- bodies


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=100, description="what the key is for, shown in the list")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=0, le=1000000)
    tokens_per_day: int | None = Field(None, ge=0, le=10**12)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    role: Literal["admin", "user"] = "user"


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disabled: bool | None = None
    role: Literal["admin", "user"] | None = None
    password: str | None = Field(None, min_length=8, max_length=1024)
    limits: Limits | None = None


# ------------------------------------------------------------------------------------------- routes


def routes() -> APIRouter:
    router = APIRouter()

    @router.post("/api/login", tags=["session"],
                 responses={401: {"description": "wrong user name or password"},
                            429: {"description": "too many failed logins (Retry-After)"}})
    async def login(body: Login, request: Request) -> JSONResponse:
        """Sign in with name and password: sets the session cookie, returns the user and its csrf_token (throttled: 429 with Retry-After)."""
        if not same_origin(request):
            raise HTTPException(403, "login refused: the request comes from another site (Origin)")
        rt = runtime(request)
        accounts = rt.accounts
        try:
            user, token, session = await run_in_threadpool(accounts.login, body.username, body.password,
                                                           client_address(request))
        except Throttled as exc:
            rt.metrics.login("throttled")
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except LoginFailed:
            rt.metrics.login("failed")
            raise HTTPException(401, LoginFailed.MESSAGE) from None
        rt.metrics.login("ok")
        accounts.expire_sessions()
        response = JSONResponse({"user": accounts.public(user), "csrf_token": session["csrf_token"],
                                 **accounts.session_expiry(session)})
        set_session_cookie(response, token, accounts.settings["session_max_age_s"])
        return response

    @router.get("/api/auth/config", tags=["session"])
    async def auth_config(request: Request) -> dict:
        """What the login page offers (public: it is shown before anybody signs in)."""
        oidc = runtime(request).config["auth"]["oidc"]
        return {"oidc": {"enabled": bool(oidc["enabled"]), "login_url": "/auth/oidc/login"}}

    @router.post("/api/logout", status_code=204, tags=["session"])
    async def logout(request: Request, principal: Caller) -> Response:
        """End this session (the cookie's)."""
        runtime(request).accounts.logout(request.cookies.get(COOKIE) if principal.via == "session" else None)
        log.info("logout: user %s from %s", principal.user["name"], client_address(request))
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @router.get("/api/session", tags=["session"])
    async def session(request: Request, principal: Caller) -> dict:
        """Who is signed in, the csrf_token and when the session expires."""
        accounts = runtime(request).accounts
        body = {"user": accounts.public(principal.user), "via": principal.via}
        if principal.session:
            body.update(csrf_token=principal.session["csrf_token"], **accounts.session_expiry(principal.session))
        return body

    @router.post("/api/password", status_code=204, tags=["session"])
    async def change_password(body: PasswordChange, request: Request, principal: Caller) -> Response:
        """Change your own password (the current one is checked; other sessions end). Not with an API key."""
        try:
            await run_in_threadpool(runtime(request).accounts.change_own_password, principal.user,
                                    body.current_password, body.new_password, principal.session)
        except Throttled as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except AccountError as exc:
            raise HTTPException(400, str(exc)) from None
        log.info("password changed by user %s (the account's other sessions ended)", principal.user["name"])
        return Response(status_code=204)

    @router.get("/api/keys", tags=["keys"])
    async def list_keys(request: Request, principal: Caller) -> list[dict]:
        """Your API keys: name, prefix, created and last used (never the secret)."""
        accounts = runtime(request).accounts
        return [accounts.public_key(row) for row in accounts.store.api_keys(principal.user["id"])]

    @router.post("/api/keys", status_code=201, tags=["keys"])
    async def create_key(request: Request, principal: Caller, body: NewKey | None = None) -> dict:
        """A new API key for apps; its secret is shown once, in this answer. Not with an API key."""
        accounts = runtime(request).accounts
        try:
            row, key = accounts.create_key(principal.user, (body or NewKey()).name)
        except AccountError as exc:
            raise HTTPException(400, str(exc)) from None
        return dict(accounts.public_key(row), key=key)

    @router.delete("/api/keys/{key_id}", status_code=204, tags=["keys"])
    async def revoke_key(key_id: Annotated[int, PathParam(ge=1, le=2**62)], request: Request,
                         principal: Caller) -> Response:
        """Revoke one of your API keys at once."""
        try:
            runtime(request).accounts.store.delete_api_key(principal.user["id"], key_id)
        except NotFound:
            raise HTTPException(404, f"no API key {key_id}") from None
        log.info("API key %d of %s revoked", key_id, principal.user["name"])
        return Response(status_code=204)

    @router.get("/api/usage", tags=["usage"])
    async def usage(request: Request, principal: Caller) -> dict:
        """Your requests and tokens today, and your limits."""
        return runtime(request).accounts.usage(principal.user)

    # ------------------------------------------------------------------ admin

    def user_or_404(request: Request, name: str) -> dict:
        try:
            return runtime(request).accounts.user(name)
        except NotFound:
            raise HTTPException(404, f"no user {name}") from None

    @router.get("/api/admin/users", tags=["admin"])
    async def users(request: Request, _: Admin) -> list[dict]:
        """Every account (admins only)."""
        accounts = runtime(request).accounts
        return [accounts.public(u) for u in accounts.store.list_users()]

    @router.post("/api/admin/users", status_code=201, tags=["admin"])
    async def add_user(body: NewUser, request: Request, principal: Admin) -> dict:
        """Create an account (admins only; not with an API key)."""
        accounts = runtime(request).accounts
        try:
            user = accounts.add_user(body.name, body.password, body.role)
        except AccountError as exc:
            raise HTTPException(409 if "exists" in str(exc) else 400, str(exc)) from None
        log.info("admin %s added user %s (role %s)", principal.user["name"], body.name, body.role)
        return accounts.public(user)

    @router.patch("/api/admin/users/{name}", tags=["admin"])
    async def change_user(name: UserName, body: UserChange, request: Request, principal: Admin) -> dict:
        """Disable, enable, change the role, reset the password or set the limits of an account (admins only; the last admin stays)."""
        accounts = runtime(request).accounts
        user = user_or_404(request, name)
        try:
            if body.role is not None:
                user = accounts.set_role(user, body.role)
            if body.disabled is not None:
                user = accounts.set_disabled(user, body.disabled)
            if body.password is not None:
                user = accounts.set_password(user, body.password)
            if "limits" in body.model_fields_set:
                user = accounts.set_limits(user, body.limits.model_dump() if body.limits else None)
        except AccountError as exc:
            raise HTTPException(400, str(exc)) from None
        log.info("admin %s changed user %s: %s", principal.user["name"], name,
                 ", ".join(sorted(body.model_fields_set - {"password"}) + (["password"] if body.password else [])))
        return accounts.public(user)

    @router.delete("/api/admin/users/{name}", status_code=204, tags=["admin"])
    async def remove_user(name: UserName, request: Request, principal: Admin) -> Response:
        """Remove an account with its conversations and keys (admins only; the last admin stays)."""
        try:
            runtime(request).accounts.remove(user_or_404(request, name))
        except AccountError as exc:
            raise HTTPException(400, str(exc)) from None
        return Response(status_code=204)

    @router.get("/api/admin/usage", tags=["admin"])
    async def all_usage(request: Request, _: Admin) -> list[dict]:
        """Requests and tokens today per account (admins only)."""
        accounts = runtime(request).accounts
        return [accounts.usage(u) for u in accounts.store.list_users()]

    return router
