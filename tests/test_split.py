"""One model across nodes (model_server.split), without processes: how the layers are cut and sized, what preflight
and `clawbot validate --inventory` refuse (with the node and the bytes), the llama-server command line, the
inventory's topology, the main node's clawbot.json, and what the roles install (stunnel configurations, units).
The real processes (ggml-rpc-server, stunnel, llama-server) are in tests/test_split_rpc.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clawbot.common import preflight, sizing
from clawbot.common.config import check_bytes
from clawbot.control import planning, split
from clawbot.control.certificates import NodeMaterial
from clawbot.control.inventory import Host, Inventory, check_inventory
from clawbot.model.engines import Paths, llama_server
from clawbot.model.runplan import HostFacts, RunPlan
from tests.fixtures_models import write_model_file

ROOT = Path(__file__).resolve().parents[1]
MIB = sizing.MIB


def _info(n_layer: int = 8, layer_mib: int = 4, tied: bool = False) -> sizing.ModelInfo:
    return sizing.ModelInfo(path="x.gguf", architecture="llama", name="x", file_bytes=(n_layer * layer_mib + 2) * MIB,
                            tensor_bytes=(n_layer * layer_mib + 2) * MIB, n_params=n_layer * layer_mib * MIB,
                            n_layer=n_layer, n_embd=512, n_head=8, n_head_kv=2, n_ff=2048, head_dim_k=64,
                            head_dim_v=64, n_ctx_train=4096, n_vocab=1000, n_expert=0,
                            layer_bytes=(layer_mib * MIB,) * n_layer,
                            output_bytes=2 * MIB if tied else MIB, input_bytes=MIB)


def _config(text: str = "{}") -> dict:
    result = check_bytes(text.encode(), "clawbot.json")
    assert result.ok, [d.text() for d in result.diagnostics]
    return result.config


def _fit(info, slots: int = 1, context: int = 1024) -> sizing.MemoryFit:
    return sizing.size_model(info, context * slots, slots)


# --------------------------------------------------------------------------- the cut


def test_the_cut_holds_every_byte_once_and_matches_llamas_layout():
    info = _info()
    fit = _fit(info)
    cut = sizing.split_layers(fit, ("main", 200 * MIB), [("w1", 200 * MIB), ("w2", 200 * MIB)])
    shares = cut.shares
    # contiguous, in order, every layer once; the output head on the last worker (llama.cpp's -ngl takes it along)
    assert [s.first_layer for s in shares] == [0, shares[0].n_layers, shares[0].n_layers + shares[1].n_layers]
    assert sum(s.n_layers for s in shares) == info.n_layer
    assert [s.output for s in shares] == [False, False, True]
    # -ngl counts the workers' layers and the output head; --tensor-split gives each worker its part of them
    assert cut.gpu_layers == shares[1].n_layers + shares[2].n_layers + 1
    assert cut.tensor_split == (shares[1].n_layers, shares[2].n_layers + 1) and sum(cut.tensor_split) == cut.gpu_layers
    # every weight once (token embeddings on the main node), every KV row once, a compute buffer per node
    assert sum(s.weights_bytes for s in shares) == info.tensor_bytes
    assert sum(s.kv_bytes for s in shares) == fit.kv_bytes
    assert shares[0].compute_bytes == fit.compute_bytes + fit.output_bytes
    assert shares[1].compute_bytes == shares[2].compute_bytes == fit.compute_bytes
    assert cut.fits and cut.refusal() == ""


def test_each_node_fills_the_same_fraction_of_its_memory():
    info = _info(n_layer=30, layer_mib=2)
    fit = _fit(info)
    cut = sizing.split_layers(fit, ("main", 100 * MIB), [("big", 200 * MIB)])
    main, big = cut.shares
    assert big.n_layers > 1.6 * main.n_layers  # twice the memory: about twice the layers (after fixed buffers)
    ratios = [s.total_bytes / s.available_bytes for s in cut.shares]
    layer = info.layer_bytes[0] + fit.kv.bytes_per_layer
    # no single layer moved from the fuller node to the other would make the fuller one less full
    assert max(ratios) <= min(ratios) + layer / 100 / MIB + 1e-9
    # more memory on the main node moves layers to it
    assert sizing.split_layers(fit, ("main", 400 * MIB), [("big", 200 * MIB)]).main.n_layers > main.n_layers


def test_a_cut_that_does_not_fit_names_the_node_and_the_bytes():
    info = _info(n_layer=10, layer_mib=10)  # 100 MiB of layers
    fit = _fit(info)
    cut = sizing.split_layers(fit, ("model-1", 60 * MIB), [("model-2", 30 * MIB)])
    assert not cut.fits
    message = cut.refusal()
    over = [s for s in cut.shares if not s.fits]
    assert over
    for share in over:
        assert f"{share.name} needs {sizing.gib(share.total_bytes)} ({share.total_bytes} bytes)" in message
        assert f"has {sizing.gib(share.available_bytes)} ({share.available_bytes} bytes)" in message
    assert f"The split needs {sizing.gib(cut.total_bytes)} in all, the nodes offer {sizing.gib(90 * MIB)}" in message


def test_unknown_memory_deals_the_layers_out_evenly_and_checks_only_what_is_known():
    cut = sizing.split_layers(_fit(_info(n_layer=7)), ("main", None), [("w1", 10 * MIB), ("w2", 100 * MIB)])
    assert [s.n_layers for s in cut.shares] == [3, 2, 2] and "unknown" in cut.how
    assert [s.fits for s in cut.shares] == [True, False, True]  # the main node's share is not judged, w1's is


# --------------------------------------------------------------------------- the run plan and the command line


def _split_config(workers, **server) -> dict:
    return _config(json.dumps({"context_window": 1024, "chat": {"summary": {"max_tokens": 64}},
                               "model_gateway": {"max_tokens": 128},
                               "model_server": {"split": {"workers": workers}, **server}}))


def test_the_command_line_hands_the_workers_their_layers_through_the_tunnels():
    config = _split_config([{"name": "w1", "port": 50060, "memory_mib": 300}, {"name": "w2", "port": 50061,
                                                                               "memory_mib": 300}])
    facts = HostFacts(gpus=(), host_free_bytes=300 * MIB, usable_cores=4, memlock_limit=preflight.UNLIMITED)
    plan = RunPlan.resolve(config, facts, _info(n_layer=12))
    cut = plan.split.value
    argv = llama_server.command(plan, config, Paths(model="/m.gguf", binary="/bin/llama-server"))
    words = " ".join(argv)
    assert "--rpc 127.0.0.1:50060,127.0.0.1:50061 -dev RPC0,RPC1" in words
    assert argv[argv.index("-ngl") + 1] == str(cut.gpu_layers)
    assert argv[argv.index("-ts") + 1] == ",".join(map(str, cut.tensor_split))
    assert argv.index("--rpc") < argv.index("-dev")  # llama.cpp registers the RPC devices before -dev names them
    assert plan.staging.value is False and "only its share" in plan.staging.reason
    assert plan.to_json()["split"]["value"]["tensor_split"] == list(cut.tensor_split)  # /status shows the cut
    # without a split: none of it
    plain = RunPlan.resolve(_config(), facts, _info(n_layer=12))
    plain_argv = llama_server.command(plain, _config(), Paths(model="/m.gguf", binary="/bin/llama-server"))
    assert not {"--rpc", "-dev", "-ts"} & set(plain_argv) and plain.split.value is None


def test_auto_slots_with_a_split_are_the_most_whose_kv_cache_the_nodes_can_hold():
    info = _info(n_layer=8, layer_mib=1)

    def cut(slots: int, mib: int) -> sizing.LayerSplit:
        # flash attention `auto` counts as on (runplan.counts_flash_attention), as the plan sizes it
        return sizing.split_layers(sizing.size_model(info, 1024 * slots, slots, flash_attn=True), ("this node", mib * MIB),
                                   [("w1", mib * MIB)])

    mib = next(m for m in range(1, 10_000) if cut(2, m).fits)  # each node: just enough for two slots
    assert not cut(3, mib).fits
    config = _split_config([{"name": "w1", "port": 50060, "memory_mib": mib}], parallel_slots=0)
    facts = HostFacts(gpus=(), host_free_bytes=mib * MIB, usable_cores=4, memlock_limit=preflight.UNLIMITED)
    plan = RunPlan.resolve(config, facts, info)
    assert plan.slots.value == 2, plan.slots.reason
    assert plan.slots.reason.startswith("auto: 2 of max_concurrency 4 slots fit the split")


def test_a_worker_without_measured_memory_is_sized_by_what_it_reported():
    config = _split_config([{"name": "w1", "port": 50060}])
    facts = HostFacts(gpus=(), host_free_bytes=100 * MIB, usable_cores=4, memlock_limit=preflight.UNLIMITED,
                      rpc_free_bytes=(("w1", 300 * MIB),))
    cut = RunPlan.resolve(config, facts, _info(n_layer=16)).split.value
    assert cut.workers[0].available_bytes == 300 * MIB and cut.workers[0].n_layers > cut.main.n_layers


# --------------------------------------------------------------------------- preflight and clawbot validate


def test_preflight_refuses_a_split_that_does_not_fit_and_names_the_node_and_bytes():
    info = _info(n_layer=10, layer_mib=10)
    config = _split_config([{"name": "model-2", "port": 50060, "memory_mib": 20}])
    node = preflight.NodeFacts(memory_total=200 * MIB, memory_available=60 * MIB, memory_source="MemAvailable")
    report = preflight.check_config(info, config, node, name="model-1")
    assert not report.fits
    errors = [f.message for f in report.findings if f.level == "error"]
    cut = report.plan.split.value
    worker = cut.workers[0]
    assert len(errors) == 1 and errors[0] == cut.refusal()
    assert f"model-2 needs {sizing.gib(worker.total_bytes)} ({worker.total_bytes} bytes)" in errors[0]
    assert f"has 20.0 MiB ({20 * MIB} bytes)" in errors[0]
    # the same model fits once the worker offers enough
    roomy = _split_config([{"name": "model-2", "port": 50060, "memory_mib": 120}])
    assert preflight.check_config(info, roomy, node, name="model-1").fits
    text = preflight.render_text(preflight.check_config(info, roomy, node, name="model-1"))
    rows = [line for line in text.splitlines() if line.startswith("split ")]
    assert len(rows) == 2 and "model-1: layers 0-" in rows[0], text
    assert "model-2: layers" in rows[1] and "and the output head" in rows[1]


def _inventory(root: Path, model: Path, main_mib: int, worker_mib: int | None) -> Path:
    worker = textwrap.dedent(f"""\
            rpc_workers:
              hosts:
                model-2:
                  ansible_host: 10.9.0.22
                  clawbot_memory_mib: {worker_mib}
                  clawbot_rpc_main: model-1
        """) if worker_mib is not None else ""
    (root / ".clawbot").mkdir(parents=True, exist_ok=True)
    (root / "hosts.yml").write_text(textwrap.dedent(f"""\
        all:
          children:
            chat_nodes:
              hosts:
                chat-a:
                  ansible_host: 10.9.0.10
            model_nodes:
              hosts:
                model-1:
                  ansible_host: 10.9.0.21
                  clawbot_memory_mib: {main_mib}
                  clawbot_model_file: {model}
        """) + textwrap.indent(worker, "    "))
    config = {"model_gateway": {"endpoint": "https://10.9.0.21:5000", "max_tokens": 64, "max_concurrency": 1},
              "context_window": 256, "chat": {"summary": {"max_tokens": 64}}, "model_server": {"parallel_slots": 1}}
    (root / ".clawbot" / "clawbot.json").write_text(json.dumps(config))
    return root


def _validate(inventory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory),
                           str(inventory / ".clawbot" / "clawbot.json")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A generated GGUF whose weights dominate its need (8 layers of 512 x 2048)."""
    return write_model_file(tmp_path_factory.mktemp("split-model"), "tiny", "Q8_0", n_layer=8, n_embd=512, n_ff=2048)


def test_validate_inventory_sizes_a_split_from_the_declared_memory(tmp_path, big_model):
    info = sizing.read_model_info(big_model)
    need = sizing.size_model(info, 256, 1).total_bytes
    one_node_mib = math.ceil(need * 0.7 / MIB)  # less than the model needs, more than half of it
    # one node alone: refused, with the bytes
    alone = _validate(_inventory(tmp_path / "alone", big_model, one_node_mib, None))
    assert alone.returncode == 1, alone.stdout
    assert "hosts.yml:11:" in alone.stdout and "model-1: model needs" in alone.stdout
    assert f"only {sizing.gib(one_node_mib * MIB)} is available" in alone.stdout
    # the same node with a worker of the same memory: the split fits, nothing to say
    pair = _validate(_inventory(tmp_path / "pair", big_model, one_node_mib, one_node_mib))
    assert pair.returncode == 0, pair.stdout + pair.stderr
    # a worker too small: refused at the main node's clawbot_memory_mib, naming the worker and its bytes
    small = _validate(_inventory(tmp_path / "small", big_model, one_node_mib, 8))
    assert small.returncode == 1, small.stdout
    line = next(line for line in small.stdout.splitlines() if "does not fit" in line)
    assert "hosts.yml:11:" in line and "model-1 with RPC workers model-2:" in line
    assert "model-2 needs " in line and f"but has 8.0 MiB ({8 * MIB} bytes)" in line


def test_the_inventorys_split_topology_is_checked_with_positions(tmp_path):
    root = tmp_path / "inv"
    root.mkdir()
    (root / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            chat_nodes:
              hosts:
                chat-a: {ansible_host: 10.9.0.10, clawbot_rpc_main: model-1}
            model_nodes:
              hosts:
                model-1: {ansible_host: 10.9.0.21}
                model-3: {ansible_host: 10.9.0.23}
            rpc_workers:
              hosts:
                model-2: {ansible_host: 10.9.0.22, clawbot_rpc_main: chat-a}
                model-3: {clawbot_rpc_main: model-1}
                model-4: {ansible_host: 10.9.0.24}
        """))
    result, _ = check_inventory(str(root))
    errors = {d.message: (d.line, d.hint) for d in result.diagnostics if d.severity == "error"}
    assert errors["chat-a: clawbot_rpc_main is set but chat-a is not in the group rpc_workers"][0] == 5
    assert errors["model-2: clawbot_rpc_main 'chat-a' is not a host of model_nodes"] == (
        12, "model nodes: model-1, model-3")
    assert any(m.startswith("model-3 is in both model_nodes and rpc_workers") for m in errors)
    assert errors["model-4 is an RPC worker but names no model node (clawbot_rpc_main) and the inventory has 2 model "
                  "nodes"][1] == "set clawbot_rpc_main to one of: model-1, model-3"


def test_the_config_refuses_a_split_it_cannot_run():
    bad = check_bytes(json.dumps({"model_server": {"engine": "llama-cpp-python", "port": 8081, "split": {
        "rpc_port": 50052, "tunnel_port": 50052,
        "workers": [{"name": "w1", "port": 8081}, {"name": "w2", "port": 50060}, {"name": "w2", "port": 50060}]}}})
        .encode(), "clawbot.json")
    messages = {d.pointer: d.message for d in bad.diagnostics if d.severity == "error"}
    assert "has no RPC backend" in messages["/model_server/engine"]
    assert "tunnel_port (50052) equals rpc_port" in messages["/model_server/split/tunnel_port"]
    assert messages["/model_server/split/workers/0/port"] == \
        "worker w1's tunnel port 8081 is already used by model_server.port"
    assert messages["/model_server/split/workers/2/port"] == "workers w2 and w2 have the same tunnel port 50060"
    assert messages["/model_server/split/workers/2/name"] == "worker w2 is listed twice"
    unknown = check_bytes(b'{"model_server": {"split": {"workers": [{"name": "w1"}]}}}', "clawbot.json")
    assert not unknown.ok and any("'port' is a required property" in d.message for d in unknown.diagnostics)


# --------------------------------------------------------------------------- deploy: plans and the main's config


def _material(tmp_path, name):
    return NodeMaterial(*(tmp_path / f"{name}.{k}" for k in ("ca", "sc", "sk", "cc", "ck")), reissued=[])


def _split_inventory(tmp_path) -> Inventory:
    hosts = {"chat-a": Host("chat-a", ["chat_nodes"], {"ansible_host": "10.0.0.5"}),
             "model-1": Host("model-1", ["model_nodes"], {"ansible_host": "10.0.0.6"}),
             "w-b": Host("w-b", ["rpc_workers"], {"ansible_host": "10.0.0.8"}),
             "w-a": Host("w-a", ["rpc_workers"], {"clawbot_address": "10.0.0.7"})}
    return Inventory(str(tmp_path), hosts)


def test_plans_give_workers_their_role_and_the_main_node_its_own_config(tmp_path):
    inventory = _split_inventory(tmp_path)
    config = _config('{"model_gateway": {"endpoint": "https://model-1:5000"}}')
    cluster_file = tmp_path / "clawbot.json"
    cluster_file.write_text(json.dumps({"model_gateway": {"endpoint": "https://model-1:5000"}}))
    state = tmp_path / "state"
    configs = split.render_main_configs(cluster_file, inventory, config, state)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(1 << 20))
    plans = planning.plan_nodes(inventory, list(inventory.hosts.values()), config, cluster_file,
                                planning.Prepared(model_file=model, engine=tmp_path / "llama-server",
                                                  rpc_engine=tmp_path / "ggml-rpc-server"),
                                {n: _material(tmp_path, n) for n in inventory.hosts}, config_files=configs)
    main, w_b, w_a, chat = plans["model-1"], plans["w-b"], plans["w-a"], plans["chat-a"]
    # workers in inventory order, one loopback port each from local_port up
    assert [(t.worker, t.address, t.remote_port, t.local_port) for t in main.rpc_main.tunnels] == [
        ("w-b", "10.0.0.8", 50053, 50060), ("w-a", "10.0.0.7", 50053, 50061)]
    assert w_b.rpc_worker == split.WorkerRole(main="model-1", address="10.0.0.8", rpc_port=50052, tunnel_port=50053,
                                              threads=0, cache=True)
    assert w_a.rpc_engine == str(tmp_path / "ggml-rpc-server") and main.rpc_engine == ""
    assert (w_a.is_model, w_a.is_chat, chat.rpc_worker, chat.rpc_main) == (False, False, None, None)
    # only the main node's clawbot.json lists the workers; it stages nothing into huge pages
    assert main.config_file == str(state / "nodes" / "model-1" / "clawbot.json") and chat.config_file == str(cluster_file)
    assert json.loads(Path(main.config_file).read_text())["model_server"]["split"]["workers"] == [
        {"name": "w-b", "address": "10.0.0.8", "port": 50060, "memory_mib": 0},
        {"name": "w-a", "address": "10.0.0.7", "port": 50061, "memory_mib": 0}]
    assert check_bytes(Path(main.config_file).read_bytes(), main.config_file).ok
    assert (main.hugepages, main.hugepages_mount, main.writable) == (0, "", ())
    assert (Path(main.config_file).stat().st_mode & 0o777) == 0o600


def test_deploy_refuses_workers_written_into_the_clusters_clawbot_json(tmp_path):
    """They would get no tunnels: the inventory is where workers are named."""
    config = _split_config([{"name": "w-a", "port": 50060}])
    with pytest.raises(split.SplitError, match="put the workers in the group rpc_workers"):
        split.render_main_configs(tmp_path / "clawbot.json", _split_inventory(tmp_path), config, tmp_path)


def test_the_workers_measured_memory_reaches_the_main_config_without_flapping(tmp_path):
    inventory = _split_inventory(tmp_path)
    config = _config('{"model_gateway": {"endpoint": "https://model-1:5000"}}')
    cluster_file = tmp_path / "clawbot.json"
    cluster_file.write_text("{}")
    path = split.render_main_configs(cluster_file, inventory, config, tmp_path)["model-1"]
    _, mains = split.roles(inventory, config)
    role = mains["model-1"]
    entries = split.update_main_config(path, role, {"w-b": 1000 * MIB, "w-a": 2000 * MIB})
    assert [e["memory_mib"] for e in entries] == [1000, 2000]
    before = path.stat().st_mtime_ns, path.read_bytes()
    # the next run measures a little differently (MemAvailable moves): the file stays as it is
    entries = split.update_main_config(path, role, {"w-b": 1060 * MIB, "w-a": 1900 * MIB})
    assert [e["memory_mib"] for e in entries] == [1000, 2000] and (path.stat().st_mtime_ns, path.read_bytes()) == before
    # a real change (the worker got more memory) is written; a worker not reached this run keeps its figure
    assert [e["memory_mib"] for e in split.update_main_config(path, role, {"w-b": 1500 * MIB})] == [1500, 2000]
    # planning again (the next deploy) keeps what was measured until preflight measures again
    split.render_main_configs(cluster_file, inventory, config, tmp_path)
    assert [w["memory_mib"] for w in json.loads(path.read_text())["model_server"]["split"]["workers"]] == [1500, 2000]


def test_a_workers_certificates_are_the_names_the_tunnels_check(tmp_path):
    """The worker's server certificate carries its inventory name (the main node's stunnel: checkHost) and the
    main node's client certificate carries the main node's (the worker's stunnel: checkHost), from the CA every
    node already trusts; a worker added later under the same address block keeps the CA (continuity)."""
    from clawbot.common import pki
    from clawbot.control import certificates

    inventory = _split_inventory(tmp_path)
    names = {h.name: h.names for h in inventory.hosts.values()}
    ca = certificates.cluster_ca(tmp_path, names, "clawbot.internal", log=lambda _: None)
    ca_bytes = ca.cert_path.read_bytes()
    worker = certificates.ensure_node_material(ca, "w-a", inventory.hosts["w-a"].names)
    main = certificates.ensure_node_material(ca, "model-1", inventory.hosts["model-1"].names)
    assert "w-a" in pki.san_identities(pki.load_certificate(worker.server_cert)).dns_names
    assert "model-1" in pki.san_identities(pki.load_certificate(main.client_cert)).dns_names
    later = {**names, "w-c.clawbot.internal": ["w-c.clawbot.internal", "10.0.0.9"]}
    again = certificates.cluster_ca(tmp_path, later, "clawbot.internal", log=lambda _: None)
    assert again.cert_path.read_bytes() == ca_bytes


# --------------------------------------------------------------------------- what the roles install


def test_the_tunnels_admit_only_the_main_node_and_only_reach_loopback():
    from roles import rpc

    role = split.WorkerRole(main="model-1", address="10.0.0.7", rpc_port=50052, tunnel_port=50053, threads=0,
                            cache=True)
    tls = {"ca_cert": "/etc/clawbot/tls/ca.pem", "server_cert": "/etc/clawbot/tls/server.pem",
           "server_key": "/etc/clawbot/tls/server.key", "client_cert": "/etc/clawbot/tls/client.pem",
           "client_key": "/etc/clawbot/tls/client.key"}
    worker = rpc.worker_tunnel_config(role, tls).splitlines()
    section = worker[worker.index("[rpc]"):]
    for line in ("accept = 10.0.0.7:50053", "connect = 127.0.0.1:50052", "requireCert = yes", "verifyChain = yes",
                 "checkHost = model-1", "sslVersionMin = TLSv1.3", "cert = /etc/clawbot/tls/server.pem",
                 "key = /etc/clawbot/tls/server.key", "CAfile = /etc/clawbot/tls/ca.pem"):
        assert line in section, line
    assert "foreground = yes" in worker and "pid =" in worker
    main = rpc.main_tunnel_config(split.MainRole((split.Tunnel("w-a", "10.0.0.7", 50053, 50060),
                                                  split.Tunnel("10.0.0.8", "10.0.0.8", 50053, 50061))), tls)
    first, second = main.split("[w-a]")[1].split("[10.0.0.8]")
    for line in ("client = yes", "accept = 127.0.0.1:50060", "connect = 10.0.0.7:50053", "verifyChain = yes",
                 "checkHost = w-a", "cert = /etc/clawbot/tls/client.pem", "key = /etc/clawbot/tls/client.key",
                 "sslVersionMin = TLSv1.3"):
        assert line in first.splitlines(), line
    assert "checkIP = 10.0.0.8" in second.splitlines()  # a worker named by its address: checked as an address
    assert rpc.rpc_server_command("/opt/clawbot/bin/ggml-rpc-server", role) == (
        "/bin/sh -c 'exec /opt/clawbot/bin/ggml-rpc-server -H 127.0.0.1 -p 50052 -t \"`nproc`\" -c'")
    # as the unit's shell runs it: every core this process may use
    import os
    import shlex

    echoed = subprocess.run(shlex.split(rpc.rpc_server_command("/bin/echo", role)), capture_output=True, text=True)
    assert echoed.stdout.split() == ["-H", "127.0.0.1", "-p", "50052", "-t", str(len(os.sched_getaffinity(0))), "-c"]


def test_the_split_units_are_hardened_like_the_agents_and_rpc_reaches_loopback_only():
    from roles import rpc, services

    role = split.WorkerRole(main="model-1", address="10.0.0.7", rpc_port=50052, tunnel_port=50053, threads=4,
                            cache=False)
    agent = services.systemd_unit(services.Service("clawbot-model", "x", "/bin/true", "clawbot"))
    hardening = {line for line in agent.splitlines() if line.split("=")[0] in {
        "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictSUIDSGID",
        "RestrictNamespaces", "RestrictRealtime", "LockPersonality", "CapabilityBoundingSet",
        "SystemCallArchitectures", "UMask"}}
    assert len(hardening) == 17
    rpc_text = rpc.systemd_unit(rpc.rpc_unit("/opt/clawbot/bin/ggml-rpc-server", role, "clawbot-rpc"))
    tunnel_text = rpc.systemd_unit(rpc.tunnel_unit("clawbot", "worker"))
    for text in (rpc_text, tunnel_text):
        assert hardening <= set(text.splitlines()), hardening - set(text.splitlines())
    rpc_lines = rpc_text.splitlines()
    assert {"User=clawbot-rpc", "IPAddressDeny=any", "IPAddressAllow=localhost", "StateDirectory=clawbot-rpc",
            'Environment="GGML_RPC_NO_RDMA=1"', 'Environment="LLAMA_CACHE=/var/lib/clawbot-rpc"'} <= set(rpc_lines)
    assert "ExecStart=/bin/sh -c 'exec /opt/clawbot/bin/ggml-rpc-server -H 127.0.0.1 -p 50052 -t 4'" in rpc_lines
    assert "User=clawbot" in tunnel_text.splitlines()  # the agent's user: it owns the node's keys
    assert "ExecStart=/usr/bin/stunnel4 /etc/clawbot/rpc/stunnel.conf" in tunnel_text.splitlines()
    program = rpc.rpc_unit("/x", role, "clawbot-rpc").service("/var/log/clawbot-rpc")
    assert "user=clawbot-rpc" in services.supervisor_program(program)


class _Op:
    """What a stock operation was asked to do; did_change() as the test decides."""

    def __init__(self, kind: str, kwargs: dict, changes: set):
        self.kind, self.kwargs = kind, kwargs
        self._changes = changes

    def did_change(self) -> bool:
        return self.kwargs.get("name") in self._changes


class _Stock:
    """Stand-ins for the stock pyinfra operations roles/rpc.py calls: they record instead of planning."""

    def __init__(self):
        self.calls: list[_Op] = []
        self.changes: set[str] = set()

    def module(self, prefix: str, *names: str):
        import types

        return types.SimpleNamespace(**{name: self._recorder(f"{prefix}.{name}") for name in names})

    def _recorder(self, kind: str):
        def call(*args, **kwargs):
            op = _Op(kind, {**kwargs, "_args": args}, self.changes)
            self.calls.append(op)
            return op
        return call

    def named(self, prefix: str) -> list[_Op]:
        return [c for c in self.calls if c.kwargs.get("name", "").startswith(prefix)]

    def restarted(self, unit: str) -> bool:
        restart = next(c for c in self.calls if c.kwargs.get("name") == f"Restart {unit} because its inputs changed")
        return restart.kwargs["_if"]()


@pytest.fixture
def stock(monkeypatch):
    from roles import rpc

    recorder = _Stock()
    monkeypatch.setattr(rpc, "apt", recorder.module("apt", "packages"))
    monkeypatch.setattr(rpc, "files", recorder.module("files", "put", "directory"))
    monkeypatch.setattr(rpc, "server", recorder.module("server", "user", "group"))
    monkeypatch.setattr(rpc, "systemd", recorder.module("systemd", "service", "daemon_reload"))
    monkeypatch.setattr(rpc, "file_copied", recorder._recorder("content.file_copied"))
    monkeypatch.setattr(rpc, "ensure_service", recorder._recorder("services.ensure_service"))
    return recorder


def _plan(tmp_path, **fields):
    import types

    tls = {"ca_cert": "/etc/clawbot/tls/ca.pem", "server_cert": "/etc/clawbot/tls/server.pem",
           "server_key": "/etc/clawbot/tls/server.key", "client_cert": "/etc/clawbot/tls/client.pem",
           "client_key": "/etc/clawbot/tls/client.key"}
    return types.SimpleNamespace(**{"user": "clawbot", "prefix": "/opt/clawbot", "tls": tls,
                                    "rpc_engine": str(tmp_path / "rpc"), "rpc_worker": None, "rpc_main": None,
                                    **fields})


def test_the_worker_role_installs_rpc_for_loopback_and_restarts_only_what_changed(tmp_path, stock):
    from io import BytesIO

    from roles import rpc

    role = split.WorkerRole(main="model-1", address="10.0.0.7", rpc_port=50052, tunnel_port=50053, threads=0,
                            cache=True)
    plan = _plan(tmp_path, rpc_worker=role)
    certificate = _Op("files.put", {"name": "Ensure /etc/clawbot/tls/server.pem is installed"}, stock.changes)
    rpc.ensure_rpc_worker.__wrapped__(plan, "systemd", changed=[certificate])
    packages = next(c for c in stock.calls if c.kind == "apt.packages")
    assert packages.kwargs["packages"] == ["stunnel4", "libgomp1"]
    user = next(c for c in stock.calls if c.kind == "server.user")
    assert (user.kwargs["user"], user.kwargs["system"], user.kwargs["shell"]) == ("clawbot-rpc", True,
                                                                                   "/usr/sbin/nologin")
    cache = next(c for c in stock.calls if c.kind == "files.directory" and c.kwargs["path"] == rpc.RPC_STATE_DIR)
    assert (cache.kwargs["user"], cache.kwargs["mode"]) == ("clawbot-rpc", "750")
    binary = next(c for c in stock.calls if c.kind == "content.file_copied")
    assert (binary.kwargs["dest"], binary.kwargs["user"], binary.kwargs["mode"], binary.kwargs["note"]) == (
        "/opt/clawbot/bin/ggml-rpc-server", "root", "755", "binary, not shown")
    puts = {c.kwargs["dest"]: c.kwargs for c in stock.calls if c.kind == "files.put"}
    conf = puts[rpc.TUNNEL_CONFIG]
    assert (conf["user"], conf["group"], conf["mode"]) == ("root", "clawbot", "640")
    assert conf["src"].getvalue().decode() == rpc.worker_tunnel_config(role, plan.tls)
    rpc_unit = puts["/etc/systemd/system/clawbot-rpc.service"]["src"].getvalue().decode()
    assert rpc_unit == rpc.systemd_unit(rpc.rpc_unit("/opt/clawbot/bin/ggml-rpc-server", role, "clawbot-rpc"))
    assert "-H 127.0.0.1" in rpc_unit and isinstance(conf["src"], BytesIO)
    assert "User=clawbot" in puts["/etc/systemd/system/clawbot-rpc-tunnel.service"]["src"].getvalue().decode()
    running = [c.kwargs["service"] for c in stock.calls if c.kind == "systemd.service" and c.kwargs.get("running")]
    assert running == ["clawbot-rpc.service", "clawbot-rpc-tunnel.service"]
    # nothing changed: nothing restarts; a new certificate restarts the tunnel only; a new binary the server only
    assert not stock.restarted("clawbot-rpc") and not stock.restarted("clawbot-rpc-tunnel")
    stock.changes.add(certificate.kwargs["name"])
    assert stock.restarted("clawbot-rpc-tunnel") and not stock.restarted("clawbot-rpc")
    stock.changes.clear()
    stock.changes.add(binary.kwargs["name"])
    assert stock.restarted("clawbot-rpc") and not stock.restarted("clawbot-rpc-tunnel")
    stock.changes.clear()
    stock.changes.add(f"Ensure {rpc.TUNNEL_CONFIG} is current")
    assert stock.restarted("clawbot-rpc-tunnel") and not stock.restarted("clawbot-rpc")


def test_the_main_role_runs_its_tunnels_and_supervisor_gets_the_same_services(tmp_path, stock):
    from roles import rpc

    role = split.MainRole((split.Tunnel("w-a", "10.0.0.7", 50053, 50060),))
    plan = _plan(tmp_path, rpc_main=role)
    rpc.ensure_rpc_tunnels.__wrapped__(plan, "systemd", changed=[])
    puts = {c.kwargs["dest"]: c.kwargs for c in stock.calls if c.kind == "files.put"}
    assert puts[rpc.TUNNEL_CONFIG]["src"].getvalue().decode() == rpc.main_tunnel_config(role, plan.tls)
    assert "/etc/systemd/system/clawbot-rpc-tunnel.service" in puts
    assert "/etc/systemd/system/clawbot-rpc.service" not in puts  # no RPC server on the main node
    # where systemd is not PID 1: the same commands, users and log directories as supervisor programs
    stock.calls.clear()
    worker = _plan(tmp_path, rpc_worker=split.WorkerRole("model-1", "10.0.0.7", 50052, 50053, 2, False))
    rpc.ensure_rpc_worker.__wrapped__(worker, "supervisor", changed=[])
    assert not [c for c in stock.calls if c.kind.startswith("systemd.")]
    programs = [c.kwargs["_args"] for c in stock.calls if c.kind == "services.ensure_service"]
    assert [(service.name, service.user, service.log_dir, manager) for service, manager in programs] == [
        ("clawbot-rpc", "clawbot-rpc", "/var/log/clawbot-rpc", "supervisor"),
        ("clawbot-rpc-tunnel", "clawbot", "/var/log/clawbot", "supervisor")]
    assert programs[0][0].command == rpc.rpc_server_command("/opt/clawbot/bin/ggml-rpc-server", worker.rpc_worker)
    assert programs[0][0].environment["GGML_RPC_NO_RDMA"] == "1"
