"""`clawbot agent --role model|chat --config PATH`: the node agent.

Role `model`: validates the config, starts the supervised model server on loopback and the mTLS
gateway in front of it, reloads on SIGHUP and picks up rotated certificates without a restart.
Role `chat`: hands over to clawbot.chat.service.serve.

Exit status 78 (EX_CONFIG from sysexits.h) means "the config is invalid or unreadable, nothing was
started": the systemd unit sets RestartPreventExitStatus=78 so a broken config does not restart-loop,
while any other failure is restarted. The errors are printed to stderr as file:line:col lines.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from clawbot.common.config import ConfigError, UnreadableFile, gateway_host_port, load_config

EXIT_CONFIG = 78
DEFAULT_STATE_DIR = "/var/lib/clawbot/agent"

log = logging.getLogger("clawbot.agent")
# Idle client connections are kept this long (uvicorn's default is 5 s): an mTLS handshake costs the chat node
# milliseconds per message, and clients that expire theirs sooner (httpx: 5 s) never race the close.
GATEWAY_KEEP_ALIVE_S = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=("model", "chat"), required=True, help="which node this agent runs")
    parser.add_argument("--config", required=True, help="path of clawbot.json")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help=f"where the agent keeps its state (hash cache, engine settings); default {DEFAULT_STATE_DIR}")
    parser.add_argument("--cert-poll-s", type=float, default=5.0,
                        help="how often the TLS files are checked for rotation (seconds, default 5)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


ACCELERATOR_ENV = "CLAWBOT_ACCELERATOR"
ACCELERATORS = ("auto", "cpu", "cuda", "vulkan", "rocm")


def _load(path: str) -> dict:
    try:
        config = load_config(path)
    except UnreadableFile as exc:
        raise ConfigErrorText(str(exc)) from None
    except ConfigError as exc:
        raise ConfigErrorText(str(exc)) from None
    return with_node_overrides(config)


def with_node_overrides(config: dict, environ=os.environ) -> dict:
    """The one per-node setting clawbot.json (shared by the cluster) cannot hold: the inventory's
    clawbot_accelerator, which deploy passes to the model agent's service as CLAWBOT_ACCELERATOR."""
    value = environ.get(ACCELERATOR_ENV, "").strip()
    if not value:
        return config
    if value not in ACCELERATORS:
        raise ConfigErrorText(f"{ACCELERATOR_ENV}={value!r} is not one of {', '.join(ACCELERATORS)} "
                              "(set by the inventory's clawbot_accelerator)")
    config["model_server"]["accelerator"] = value
    return config


class ConfigErrorText(Exception):
    """A config that cannot be used, with its positioned error lines."""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call drowns the agent's own log
    try:
        config = _load(args.config)
    except ConfigErrorText as exc:
        print(f"clawbot agent: not starting, {args.config} is invalid:", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    if args.role == "chat":
        from clawbot.chat import service as chat

        return int(chat.serve(config, args.config) or 0)
    missing = [f"{key}: {path}" for key, path in config["tls"].items()
               if key.startswith(("ca_", "server_")) and not Path(path).is_file()]
    if missing:
        print("clawbot agent: not starting, TLS files are missing (the rollout's pki role installs them):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(ModelNode(config, args).serve())


RESTART_EXIT = 75  # EX_TEMPFAIL: the service manager starts the agent again (not RestartPreventExitStatus)


class ModelNode:
    """Wires supervisor, gateway, certificate watcher and uvicorn together; owns SIGHUP."""

    def __init__(self, config: dict, args: argparse.Namespace):
        self.config = config
        self.config_path = args.config
        self.state_dir = Path(args.state_dir)
        self.cert_poll_s = args.cert_poll_s
        self.log_level = args.log_level

    async def serve(self) -> int:
        import uvicorn

        from clawbot.common import mtls
        from clawbot.model.gateway import Gateway, create_app
        from clawbot.model.supervisor import Supervisor
        from clawbot.model.swap import Swapper, kept_model

        self.state_dir.mkdir(parents=True, exist_ok=True)
        tls = self.config["tls"]
        try:
            context = mtls.server_context(tls)
        except (ssl.SSLError, OSError, ValueError) as exc:
            print(f"clawbot agent: not starting, the gateway's TLS files do not load: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        kept, serve_with = kept_model(self.state_dir, self.config)  # the last swap rejected model_path's file
        supervisor = Supervisor(serve_with, self.state_dir, model_file=kept or None)
        self.watcher = mtls.CertWatcher(context, tls, self.cert_poll_s)
        self.gateway = Gateway(self.config, supervisor, self.watcher,
                               agent_info={"config_path": os.path.abspath(self.config_path), "agent_pid": os.getpid()})
        self.swapper = self.gateway.swap = Swapper(self.gateway, self.state_dir)
        self.gateway.applied = self._applied()
        app = create_app(self.gateway)
        _, port = gateway_host_port(self.config["model_gateway"]["endpoint"])
        uconfig = uvicorn.Config(
            app, host=self.config["model_gateway"]["bind_address"], port=port,
            http=mtls.PeerCertH11Protocol, lifespan="off", log_level=self.log_level,
            ssl_certfile=tls["server_cert"], ssl_keyfile=tls["server_key"], ssl_ca_certs=tls["ca_cert"],
            ssl_cert_reqs=ssl.CERT_REQUIRED, timeout_graceful_shutdown=5,
            timeout_keep_alive=GATEWAY_KEEP_ALIVE_S,
        )
        uconfig.load()
        uconfig.ssl = context  # our own context object, so rotation can reload it in place
        server = self.server = uvicorn.Server(uconfig)
        self.exit_code: int | None = None

        # uvicorn re-raises SIGTERM/SIGINT with the handlers it found once it has shut down; handlers that
        # only record the signal let the model server be stopped cleanly below instead of dying mid-cleanup.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        supervisor.start()
        self.watcher.start()
        if kept:
            loop.create_task(self._retry_swap(supervisor))
        log.info("model agent: gateway on https://%s:%d, model server on %s", uconfig.host, port,
                 supervisor.base_url)
        try:
            await server.serve()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            await self.watcher.stop()
            await self.swapper.cancel()
            await self.gateway.supervisor.stop()
            await self.gateway.close()
        if self.exit_code is not None:
            return self.exit_code
        return 0 if server.started else 1

    async def reload(self) -> None:
        """SIGHUP: an invalid config is refused (positions logged) and the running one kept."""
        try:
            new = _load(self.config_path)
        except ConfigErrorText as exc:
            log.error("reload refused, keeping the running config: %s is invalid:\n%s", self.config_path, exc)
            return
        old = self.config
        if (new["model_gateway"]["endpoint"], new["model_gateway"]["bind_address"]) != (
                old["model_gateway"]["endpoint"], old["model_gateway"]["bind_address"]):
            # deploy reloads on a new clawbot.json: the listener can only move with a new process, so exit with
            # EX_TEMPFAIL and let systemd (Restart=on-failure) or supervisor start the agent again
            log.warning("model_gateway.endpoint/bind_address changed: restarting the agent to move the listener")
            self.exit_code = RESTART_EXIT
            self.server.should_exit = True
            return
        self.config = new
        self.gateway.applied = self._applied()
        change = await self.swapper.apply(new)
        self.gateway.apply(new)
        self.watcher.set_tls(new["tls"])
        self.watcher.check_now()
        what = {"none": "gateway limits applied live, model server untouched",
                "swap": f"{change.reason}: staged swap, the serving model answers until the new one passed the gate",
                "restart": f"model server restarting: {change.reason}"}[change.mode]
        log.info("config reloaded from %s (%s)", self.config_path, what)

    def _applied(self) -> dict:
        from clawbot.model.supervisor import file_identity

        model = self.config["model_server"]["model_path"]
        return {"config_path": os.path.abspath(self.config_path), "config": file_identity(self.config_path),
                "model_path": model, "model": file_identity(model)}

    async def _retry_swap(self, supervisor) -> None:
        """Started on a kept model (a rejected swap): once it serves, try the configured model again."""
        if await supervisor.wait_ready(supervisor.config["model_server"]["startup_timeout_s"] + 5):
            await self.swapper.apply(self.config)
