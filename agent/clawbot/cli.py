"""`clawbot` command line: a thin dispatcher that imports only the subcommand it runs.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Importing lazily keeps `clawbot validate` fast (no FastAPI, pyinfra or ansible on its path).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add new subcommands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("clawbot.common.validate", "check clawbot.json (and an inventory) against the schema"),
    "agent": ("clawbot.agentmain", "run the node agent (--role model|chat)"),
    "preflight": ("clawbot.common.preflight", "check that the model fits this node before rollout"),
    "bench": ("clawbot.tools.bench", "measure first-token latency and throughput of a gateway"),
    "build-engine": ("clawbot.model.engines.build", "build llama-server from the pinned llama-cpp-python sdist"),
    "make-model": ("clawbot.tools.modelgen", "write a shape-faithful random-weight GGUF for tests and benchmarks"),
    "eval": ("clawbot.tools.evaluate", "check that a model answers well: smoke set against a URL, KL divergence against a reference"),
    "quantize": ("clawbot.tools.quantize", "quantize a GGUF with llama-quantize and refuse the result beyond the quality gate"),
    "users": ("clawbot.chat.users", "manage the chat node's accounts and API keys (here, or -i INVENTORY over SSH)"),
    "kb": ("clawbot.chat.kb", "add, list and remove the chat node's knowledge-base documents (Markdown, text, PDF)"),
    "status": ("clawbot.control.status", "show every node's agent, model and certificate state"),
    "monitoring": ("clawbot.control.monitoring", "write a Prometheus scrape config, alert rules and a Grafana dashboard"),
    "docs": ("clawbot.common.schemadocs", "regenerate the reference pages in docs/ from the schemas and the code"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: clawbot COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `clawbot COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from clawbot import __version__

        print(f"clawbot {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"clawbot: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"clawbot {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
