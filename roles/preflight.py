"""Before any change: does the model fit each model node? (issue: sizing and preflight)

The need is computed exactly from the model file and clawbot.json by `clawbot.common.sizing` (weights + KV cache for
context_window x parallel_slots + compute buffers), the same computation `clawbot preflight` and the
hugepages role use. The node's side is one fact, `clawbot.control.facts.NodeMemory`, read over the already open
SSH connection: MemAvailable (plus what the running clawbot services hold, so a re-run does not count the model
against itself), the cgroup limit, free disk where the model goes, and the NVIDIA GPUs. Nothing is installed or
changed on the node for this.
"""

from __future__ import annotations

import os

from pyinfra.api import DeployError

from clawbot.common import preflight
from clawbot.common import sizing
from clawbot.control.facts import NodeMemory


def check_node(node, model_info: sizing.ModelInfo, config: dict, user: str | None = None) -> preflight.PreflightReport:
    """Preflight one model node from its NodeMemory fact; errors in report.findings stop the rollout.

    + node: the connected pyinfra Host (the fact is read with node.get_fact), or a run_shell(command) -> (ok,
      stdout) callable that runs the fact's command
    + model_info: the model's exact sizes (clawbot.common.sizing.read_model_info)
    + config: the node's checked clawbot.json (model_server.model_path says where the model goes)
    + user: the agent's system user whose processes' memory counts as available; default: the node plan's user
      (host.data.clawbot_plan), else clawbot
    """
    model_dir = os.path.dirname(config["model_server"]["model_path"])
    if callable(node):
        fact = NodeMemory()
        _ok, output = node(fact.command(model_dir, user or "clawbot"))
        facts = fact.process(output.splitlines())
    else:
        plan = node.data.get("clawbot_plan")
        user = user or getattr(plan, "user", None) or "clawbot"
        facts = node.get_fact(NodeMemory, model_dir=model_dir, user=user)
    if facts is None:  # the fact's command failed (pyinfra printed its output)
        raise DeployError(f"preflight: cannot read {NodeMemory.name} on {getattr(node, 'name', node)}")
    return preflight.check_config(model_info, config, facts)
