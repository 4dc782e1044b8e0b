"""The chat node: conversation API + web UI over HTTPS, talking to the model node's gateway over mTLS.

`serve(config, config_path)` runs until SIGTERM/SIGINT (uvicorn, graceful) and reloads on SIGHUP:
the config file is read and checked again (a bad file is logged and the running config kept), the
gateway client is rebuilt with the current client certificate, and a rotated server certificate is
swapped into the live TLS context. bind_address and port changes need a restart (logged).

Sending a message: clawbot.chat.replies streams the reply; while every model slot is busy the message waits
in the chat node's fair line (clawbot.chat.queueing) with its place shown. When the gateway is down (unreachable,
not ready, failing) or the wait passes chat.queue.max_wait_s, the configured fallbacks answer instead; every
reply records its source (model, knowledge_base, web_search, none).

Memory: clawbot.chat.memory freezes the loaded app after startup and collects every few seconds what closed
connections leave in reference cycles, so RSS stays flat under load.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from clawbot import __version__
from clawbot.chat import access, memory, openai_api
from clawbot.chat.access import Admin, Caller
from clawbot.chat.accounts import Accounts, LimitReached
from clawbot.chat.metrics import ChatMetrics
from clawbot.common import pki
from clawbot.chat.context import ContextKeeper, Settings
from clawbot.chat.fallbacks import Fallbacks
from clawbot.chat.queueing import FairQueue
from clawbot.chat.replies import GatewayWatch, apply_health, queue_capacity, reply_stream, watch_gateway
from clawbot.chat.upstreams import UpstreamPool
from clawbot.chat.store import NotFound, Store

log = logging.getLogger("clawbot.chat.service")

WEB_DIR = Path(__file__).parent / "web"
MAX_MESSAGE_CHARS = 32000
ConversationId = Annotated[str, PathParam(pattern="^[0-9a-f]{32}$", description="conversation id (32 hex digits)")]


# ------------------------------------------------------------------------------------------- request bodies


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field("", max_length=200, description="shown in the conversation list; empty: from the first message")


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS, description="the user's message")

    @field_validator("content")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message is empty (only whitespace)")
        if "\x00" in value:
            raise ValueError("message contains a NUL character")
        return value


class ErrorBody(BaseModel):
    error: str
    detail: list | None = None


ERRORS = {404: {"model": ErrorBody, "description": "no such conversation"},
          422: {"model": ErrorBody, "description": "invalid request"}}


# ------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Everything derived from one config; replaced as a whole on SIGHUP."""

    config: dict
    store: Store
    client: UpstreamPool  # every model node's gateway (clawbot.chat.upstreams)
    keeper: ContextKeeper
    fallbacks: Fallbacks
    accounts: Accounts
    metrics: ChatMetrics
    queue: FairQueue  # kept across reloads: messages in line and in flight hold places in it
    watch: GatewayWatch

    @classmethod
    def build(cls, config: dict, store: Store | None = None, previous: "Runtime | None" = None) -> "Runtime":
        chat = config["chat"]
        store = store or Store(chat["database"])
        gateway = config["model_gateway"]
        client = UpstreamPool(gateway["upstreams"] or [gateway["endpoint"]], config["tls"], chat["request_timeout_s"],
                              gateway["max_concurrency"], previous.client if previous is not None else None)
        keeper = ContextKeeper(store, client, Settings.from_config(config))
        accounts = Accounts(store, config["auth"])
        if previous is not None and previous.store is store:
            accounts.carry_over(previous.accounts)
        metrics = previous.metrics if previous is not None else ChatMetrics(lambda: store)
        watch = previous.watch if previous is not None else GatewayWatch()
        queue = previous.queue if previous is not None else FairQueue(queue_capacity(config, watch))
        if previous is None:
            metrics.watch_line(queue)
        queue.capacity = queue_capacity(config, watch)
        return cls(config, store, client, keeper, Fallbacks.from_config(config, store), accounts, metrics, queue, watch)


# ------------------------------------------------------------------------------------------- app


def create_app(config: dict, config_path: str | None = None) -> FastAPI:
    state: dict = {"runtime": Runtime.build(config), "locks": {}, "running": {}, "ssl_context": None,
                   "started": time.time(), "reloads": 0, "last_reload_error": ""}

    def rt() -> Runtime:
        return state["runtime"]

    rt().metrics.watch_upstreams(lambda: rt().client)

    async def reload() -> None:
        from clawbot.common.config import ConfigError, load_config

        if not config_path:
            log.warning("SIGHUP: no config path known, nothing to reload")
            return
        try:
            new_config = load_config(config_path)
        except (ConfigError, OSError) as exc:
            state["last_reload_error"] = str(exc)
            log.error("SIGHUP: %s is not valid, keeping the running config:\n%s", config_path, exc)
            return
        old = rt()
        same_db = new_config["chat"]["database"] == old.config["chat"]["database"]
        try:
            new = Runtime.build(new_config, old.store if same_db else None, old)
        except Exception as exc:  # bad TLS files and the like: keep serving with what works
            state["last_reload_error"] = f"{type(exc).__name__}: {exc}"
            log.error("SIGHUP: cannot apply the new config, keeping the running one: %s", exc)
            return
        moved = [key for key in ("bind_address", "port") if new_config["chat"][key] != old.config["chat"][key]]
        if moved and state.get("server") is not None:
            # deploy reloads on a new clawbot.json; the listener moves only with a new process: exit so that
            # systemd (Restart=on-failure) or supervisor starts the agent again
            log.warning("SIGHUP: chat.%s changed; restarting the agent to move the listener", " and chat.".join(moved))
            state["restart"] = True
            state["server"].should_exit = True
            return
        if state["ssl_context"] is not None:
            try:
                pki.reload_cert_chain(state["ssl_context"], new_config["tls"]["server_cert"], new_config["tls"]["server_key"])
            except (OSError, ValueError) as exc:
                log.error("SIGHUP: server certificate not reloaded (old one kept): %s", exc)
        state["runtime"] = new
        state["reloads"] += 1
        state["last_reload_error"] = ""
        asyncio.get_running_loop().call_later(
            new_config["chat"]["request_timeout_s"] + 60, lambda: asyncio.ensure_future(old.client.aclose()))
        log.info("SIGHUP: configuration reloaded from %s", config_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or no SIGHUP
            log.debug("SIGHUP reload not available in this thread")
        rt().accounts.ensure_bootstrap_admin()
        rt().accounts.expire_sessions()
        try:
            rt().fallbacks.knowledge_base.refresh(force=True)
        except Exception as exc:  # a broken KB must not stop the chat node
            log.warning("knowledge base not indexed at start: %s", exc)
        watcher = asyncio.ensure_future(watch_gateway(rt))
        memory.freeze()  # the loaded app is not garbage: full collections walk only what requests make
        housekeeper = asyncio.ensure_future(memory.keep_flat())  # closed connections freed within seconds
        yield
        watcher.cancel()
        housekeeper.cancel()
        memory.unfreeze()
        try:
            loop.remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        await rt().client.aclose()
        if state.get("sso"):
            await state["sso"][1].aclose()
        rt().store.close()

    app = FastAPI(title="clawbot chat node", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Conversation API of the chat node. Replies stream as Server-Sent Events.")
    app.state.clawbot = state

    # ------------------------------------------------------------------ errors: always JSON {"error": ...}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        if request.scope["path"].startswith("/v1/"):
            return openai_api.openai_error(400, "invalid request: " + "; ".join(problems), "invalid_request_error")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems), "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = getattr(exc, "headers", None)
        if request.scope["path"].startswith("/v1/"):
            return openai_api.openai_error(exc.status_code, message, openai_api.ERROR_TYPES.get(exc.status_code, "error"),
                                           headers=headers)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if access.needs_credential(request):  # before routing: no credential, no answer (not even a 404 or 422)
            principal = await run_in_threadpool(access.principal_of, request)  # argon2id stays off the event loop
            if principal is None:
                return await http_error(request, StarletteHTTPException(
                    401, access.NOT_SIGNED_IN, headers={"WWW-Authenticate": "Bearer"}))
            request.state.principal = principal
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.scope["path"].startswith(("/api/", "/v1/")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def conversation_or_404(conversation_id: str, principal) -> dict:
        try:
            return rt().store.get_conversation(conversation_id, owner_id=principal.user["id"])
        except NotFound:
            raise HTTPException(404, f"no conversation {conversation_id}") from None

    app.include_router(access.routes())
    app.include_router(openai_api.routes())

    # ------------------------------------------------------------------ single sign-on (auth.oidc)

    def sso():
        """The OpenID Connect relying party for the running config's auth.oidc (None when it is off)."""
        from clawbot.chat.oidc import OidcLogin

        settings = rt().config["auth"]["oidc"]
        if not settings["enabled"]:
            return None
        current = state.get("sso")
        if current is None or current[0] != settings:
            state["sso"] = (dict(settings), OidcLogin(settings))
        return state["sso"][1]

    def sso_failure(request: Request, reason: str, login=None) -> Response:
        log.warning("SSO login failed from %s: %s", access.client_address(request), reason)
        rt().metrics.login("failed")
        page = (f"<!doctype html><title>Sign-in failed</title><p>Single sign-on did not sign you in: {html.escape(reason)}"
                "</p><p><a href=\"/\">Back to the sign-in page</a></p>")
        response = HTMLResponse(page, status_code=400)
        if login is not None:
            login.clear_cookie(response)
        return response

    @app.get("/auth/oidc/login", include_in_schema=False)
    async def sso_start(request: Request) -> Response:
        from clawbot.chat.oidc import OidcConfigError, OidcError

        try:
            login = sso()
            if login is None:
                raise HTTPException(404, "single sign-on is not configured (auth.oidc.enabled)")
            return await login.login_redirect(request)
        except (OidcError, OidcConfigError) as exc:
            return sso_failure(request, str(exc))

    @app.get("/auth/oidc/callback", include_in_schema=False)
    async def sso_callback(request: Request) -> Response:
        from clawbot.chat.oidc import OidcConfigError, OidcError

        login = None
        try:
            login = sso()
            if login is None:
                raise HTTPException(404, "single sign-on is not configured (auth.oidc.enabled)")
            identity = await login.callback(request)
        except (OidcError, OidcConfigError) as exc:
            return sso_failure(request, str(exc), login)
        accounts = rt().accounts
        user = accounts.sso_user(identity.issuer, identity.subject, identity.username, identity.is_admin)
        if user["disabled"]:
            return sso_failure(request, f"the account {user['name']} is disabled", login)
        user, token, _ = accounts.start_session(user, access.client_address(request))
        log.info("login: user %s from %s (SSO, %s)", user["name"], access.client_address(request), identity.issuer)
        rt().metrics.login("ok")
        response = RedirectResponse("/", status_code=303)
        access.set_session_cookie(response, token, rt().config["auth"]["session_max_age_s"])
        login.clear_cookie(response)
        return response

    # ------------------------------------------------------------------ health and status

    @app.get("/healthz", tags=["status"])
    async def healthz() -> dict:
        """Liveness, without a credential: the chat agent answers."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["status"], responses={200: {"content": {"text/plain": {}}}})
    async def metrics(_: Admin) -> Response:
        """Prometheus metrics of the chat node (per-account usage and refusals); admin sessions or keys only."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(rt().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status", tags=["status"])
    async def status(_: Caller) -> dict:
        """The status strip: this chat node, the model nodes' readiness (`gateway.upstreams`: each one), the line,
        and `fallback_problems`: each configured fallback that cannot answer now, with why."""
        runtime = rt()
        chat = {"state": "ok", "version": __version__, "uptime_s": round(time.time() - state["started"], 1),
                "reloads": state["reloads"]}
        try:
            runtime.store.ping()
            chat["database"] = "ok"
        except Exception as exc:
            chat.update(state="degraded", database=f"error: {exc}")
        if state["last_reload_error"]:
            chat["last_reload_error"] = state["last_reload_error"]
        gateway = runtime.watch.fresh()  # every open page polls this: ask the model nodes at most once a watch round
        if gateway is None:
            gateway = await runtime.client.health()
            apply_health(runtime, gateway)
        gateway = dict(gateway, upstreams=runtime.client.describe())  # in-flight counts as of now
        return {"chat": chat, "gateway": gateway, "queue": runtime.queue.snapshot(),
                "fallback_strategies": runtime.config["fallback_strategies"],
                "fallback_problems": runtime.fallbacks.problems(),
                "context_window": runtime.config["context_window"]}

    # ------------------------------------------------------------------ conversations

    @app.post("/api/conversations", status_code=201, tags=["conversations"], responses=ERRORS)
    async def create_conversation(principal: Caller, body: NewConversation | None = None) -> dict:
        """Start a conversation of your own."""
        return rt().store.create_conversation((body or NewConversation()).title, owner_id=principal.user["id"])

    @app.get("/api/conversations", tags=["conversations"])
    async def list_conversations(principal: Caller) -> list[dict]:
        """Your conversations, newest first."""
        return rt().store.list_conversations(principal.user["id"])

    @app.get("/api/conversations/{conversation_id}", tags=["conversations"], responses=ERRORS)
    async def get_conversation(conversation_id: ConversationId, principal: Caller) -> dict:
        """One of your conversations with every message (summaries included)."""
        conversation = conversation_or_404(conversation_id, principal)
        conversation["messages"] = rt().store.messages(conversation_id)
        return conversation

    @app.get("/api/conversations/{conversation_id}/requests", tags=["conversations"], responses=ERRORS)
    async def model_requests(conversation_id: ConversationId, principal: Caller) -> list[dict]:
        """Every request sent to the model for this conversation, with its prompt size in model tokens."""
        conversation_or_404(conversation_id, principal)
        return rt().store.requests(conversation_id)

    @app.delete("/api/conversations/{conversation_id}", status_code=204, tags=["conversations"], responses=ERRORS)
    async def delete_conversation(conversation_id: ConversationId, principal: Caller) -> Response:
        """Delete one of your conversations and its messages."""
        try:
            rt().store.delete_conversation(conversation_id, owner_id=principal.user["id"])
        except NotFound:
            raise HTTPException(404, f"no conversation {conversation_id}") from None
        return Response(status_code=204)

    @app.post("/api/conversations/{conversation_id}/messages", tags=["conversations"],
              responses={**ERRORS, 200: {"description": "the reply as Server-Sent Events: user, summary, start, "
                                                        "token..., done (or error)",
                                         "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def send_message(conversation_id: ConversationId, body: NewMessage, principal: Caller) -> StreamingResponse:
        """Send a message and stream the reply (see The reply stream); per-user limits are checked first (429)."""
        runtime = rt()
        conversation = conversation_or_404(conversation_id, principal)
        admit_web(runtime, principal)
        user = runtime.store.add_message(conversation_id, "user", body.content)  # durable before streaming
        if conversation["title"] == "New conversation":
            title = " ".join(body.content.split())
            runtime.store.rename_conversation(conversation_id, title[:60] + ("…" if len(title) > 60 else ""))
        return reply_response(runtime, conversation_id, user, principal.user)

    def admit_web(runtime: Runtime, principal) -> None:
        """The per-user limits, before a message joins the line (429 with Retry-After), and the request counted."""
        try:
            runtime.accounts.admit(principal.user)
        except LimitReached as exc:
            runtime.metrics.limited(principal.user["name"], exc.limit)
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        runtime.metrics.request(principal.user["name"], "web")

    def reply_response(runtime: Runtime, conversation_id: str, user: dict, account: dict,
                       first: dict | None = None) -> StreamingResponse:
        entry = state["locks"].setdefault(conversation_id, [asyncio.Lock(), 0])  # [lock, replies using it]
        entry[1] += 1

        async def stream():
            try:
                async for event in reply_stream(runtime, state["running"], entry[0], conversation_id, user, account,
                                                first):
                    yield event
            finally:  # the last reply of a conversation drops its lock: the dict does not grow with conversations
                entry[1] -= 1
                if entry[1] == 0 and state["locks"].get(conversation_id) is entry:
                    del state["locks"][conversation_id]

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/conversations/{conversation_id}/regenerate", tags=["conversations"],
              responses={**ERRORS, 409: {"model": ErrorBody, "description": "nothing to regenerate"},
                         200: {"description": "a new reply to the last message, as Server-Sent Events (the first, "
                                              "`user`, names the replies it removed)",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def regenerate(conversation_id: ConversationId, principal: Caller) -> StreamingResponse:
        """Answer the conversation's last message again: the replies after it are removed, a new one streams."""
        runtime = rt()
        conversation_or_404(conversation_id, principal)
        if conversation_id in state["running"]:
            raise HTTPException(409, "a reply is still being written; stop it first")
        users = [m for m in runtime.store.messages(conversation_id) if m["role"] == "user"]
        if not users or users[-1]["status"] != "complete":
            raise HTTPException(409, "nothing to regenerate: the last message was not sent to the model")
        admit_web(runtime, principal)
        removed = runtime.store.remove_replies_after(conversation_id, users[-1]["id"])
        return reply_response(runtime, conversation_id, users[-1], principal.user,
                              {"regenerated": True, "removed": removed})

    @app.post("/api/conversations/{conversation_id}/stop", tags=["conversations"], responses=ERRORS)
    async def stop(conversation_id: ConversationId, principal: Caller) -> dict:
        """Stop the conversation's reply: a message still waiting in line is cancelled (never sent), a reply being
        written ends where it is (the model stops generating it) and is kept, marked stopped."""
        conversation_or_404(conversation_id, principal)
        run = state["running"].get(conversation_id)
        if run is None:
            return {"stopped": False, "phase": None}
        run.stop.set()
        return {"stopped": True, "phase": run.phase}

    # ------------------------------------------------------------------ web UI

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> RedirectResponse:
        return RedirectResponse("/static/favicon.svg", status_code=308)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


# ------------------------------------------------------------------------------------------- entry point


def serve(config: dict, config_path: str) -> int:
    """Run the chat node until SIGTERM/SIGINT; SIGHUP reloads (see the module docstring)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat, tls = config["chat"], config["tls"]
    app = create_app(config, config_path)
    uv_config = uvicorn.Config(app, host=chat["bind_address"], port=chat["port"],
                               ssl_certfile=tls["server_cert"], ssl_keyfile=tls["server_key"],
                               log_level="info", access_log=False, proxy_headers=False,
                               timeout_graceful_shutdown=5, lifespan="on")
    uv_config.load()  # builds the SSLContext now, so SIGHUP can swap a rotated certificate into it
    app.state.clawbot["ssl_context"] = uv_config.ssl
    server = app.state.clawbot["server"] = uvicorn.Server(uv_config)
    log.info("chat node on https://%s:%d (gateway %s)", chat["bind_address"], chat["port"],
             config["model_gateway"]["endpoint"])
    server.run()
    if app.state.clawbot.get("restart"):
        from clawbot.agentmain import RESTART_EXIT

        return RESTART_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m clawbot.chat.service --config PATH`: the same as `clawbot agent --role chat` (for development)."""
    import argparse

    from clawbot.common.config import load_config

    parser = argparse.ArgumentParser(prog="python -m clawbot.chat.service")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return serve(load_config(args.config), args.config)


if __name__ == "__main__":
    raise SystemExit(main())
