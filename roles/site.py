"""The per-host deploy: every role in order, driven by the node's plan (clawbot.control.planning.NodePlan).

hosts -> hugepages (model nodes) -> service user -> hugetlbfs mount -> pki -> agent -> model -> chat (secrets,
knowledge directory, service); a split (model_server.split): an RPC worker gets ggml-rpc-server and its tunnel instead
of an agent, a main model node its tunnels to its workers before its agent's service
"""

from __future__ import annotations

from pyinfra import host

from clawbot.model.runplan import node_accelerator

from roles.agent import ensure_agent, ensure_service_user
from roles.chat import ensure_chat_service, ensure_knowledge_base, install_chat_secrets, knowledge_base_plan
from roles.hosts import ensure_hosts_entries
from roles.hugepages import ensure_hugepages, ensure_hugetlbfs_mount
from roles.model import ensure_engine_and_model, ensure_model_service
from roles.pki import install_node_certificates
from roles.rpc import ensure_rpc_tunnels, ensure_rpc_worker
from roles.services import service_manager, systemd_is_pid1


def converge() -> None:
    """Converge the current pyinfra host to host.data.clawbot_plan (with host.data.clawbot_wheelhouse)."""
    plan = host.data.clawbot_plan
    systemd_running = systemd_is_pid1()
    ensure_hosts_entries([(address, list(names)) for address, names in plan.hosts_entries])
    if plan.is_model:
        ensure_hugepages(plan.hugepages, plan.thp)
    ensure_service_user(plan.user)
    if plan.is_model and plan.hugepages_mount:
        ensure_hugetlbfs_mount(plan.hugepages_mount, plan.user, systemd_running)  # after the user: a mount option
    # a reissued leaf has new contents, so its copy is a change and restarts the agents
    certificates = install_node_certificates(plan.material, plan.tls, plan.user)
    wheelhouse, stamp = host.data.clawbot_wheelhouse
    runs_agent = plan.is_model or plan.is_chat  # a node that is only an RPC worker runs no agent
    agent = ensure_agent(plan.config_file, wheelhouse, stamp, plan.user, plan.prefix, plan.offline) if runs_agent else []
    manager = service_manager(plan.service_manager, systemd_running)
    host.data.clawbot_service_manager_used = manager
    if plan.rpc_worker is not None:
        ensure_rpc_worker(plan, manager, changed=certificates)
    if plan.rpc_main is not None:
        ensure_rpc_tunnels(plan, manager, changed=certificates)
    if plan.is_model:
        # the GPUs preflight read (clawbot.control.rollout.preflight_model_nodes): no second round trip
        accelerator = node_accelerator(plan.accelerator, host.data.clawbot_node.gpus)
        model, *engine = ensure_engine_and_model(plan, accelerator)
        # a new clawbot.json or model file is reloaded (SIGHUP): the agent swaps the model in without downtime
        # (clawbot.model.swap); a new agent, engine or certificate restarts it
        installed, config = agent
        # deploy's swap check after the run (clawbot.control.rollout) asks whether this run restarted or reloaded it
        host.data.clawbot_model_applied = ensure_model_service(plan, accelerator, manager,
                                                               changed=[installed, *engine, *certificates],
                                                               reloaded=[config, model])
    if plan.is_chat:
        secrets = install_chat_secrets(plan.chat_files, plan.user)
        ensure_knowledge_base(*knowledge_base_plan(plan), plan.user)  # the agent rescans: no restart
        installed, config = agent
        ensure_chat_service(plan.prefix, plan.user, manager, changed=[installed, *certificates, *secrets],
                            reloaded=[config])
