"""Model weights in huge pages (issue 8): the agent stages the GGUF into hugetlbfs, llama-server maps it with
2048 kB pages, HugePages_Free drops by the model's pages; a pool too small means the on-disk file, with the
reason in /status. The huge page pool is kernel-global: every test puts vm.nr_hugepages back and unmounts
what it (or the agent it started) mounted. Runs as root (the agent mounts hugetlbfs itself then).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clawbot.model import staging
from clawbot.common import preflight, sizing
from clawbot.model.supervisor import file_sha256
from tests.fixtures_agent import (  # noqa: F401  (fixtures)
    llama_server_binary,
    models_dir,
    pki_files,
    start_agent,
    tiny_gguf,
    wait_for,
)
from tests.fixtures_models import gguf_100m, write_model_file  # noqa: F401

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
PAGE = 2 << 20


def free_pages() -> int:
    info = preflight.read_meminfo()
    return info["HugePages_Free"] - info.get("HugePages_Rsvd", 0)


@pytest.fixture
def pool():
    """set(n): make exactly n huge pages free (on top of whatever others use); restored afterwards."""
    saved = NR_HUGEPAGES.read_text()

    def set_free(n: int) -> int:
        info = preflight.read_meminfo()
        in_use = info["HugePages_Total"] - info["HugePages_Free"] + info.get("HugePages_Rsvd", 0)
        NR_HUGEPAGES.write_text(str(in_use + n))
        wait_for(lambda: free_pages() >= n, 20, 0.2, f"{n} free huge pages")
        return free_pages()

    yield set_free
    NR_HUGEPAGES.write_text(saved)


@pytest.fixture
def mount_dir(tmp_path):
    """A directory for a hugetlbfs mount; unmounted at the end whoever mounted it."""
    path = tmp_path / "hugepages"
    yield path
    if staging.is_hugetlbfs(path):
        subprocess.run(["umount", str(path)], check=False)


def smaps_page_sizes(pid: int, path: str) -> set[int]:
    sizes, current = set(), False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            current = len(parts) >= 6 and parts[5] == path
        elif current and parts[0] == "KernelPageSize:":
            sizes.add(int(parts[1]))
    return sizes


def test_staged_weights_sit_in_2m_pages_and_free_drops_by_the_model(tmp_path, pki_files, gguf_100m,  # noqa: F811
                                                                   llama_server_binary, pool, mount_dir):  # noqa: F811
    size = gguf_100m.stat().st_size
    expected_pages = math.ceil(size / PAGE)
    pool(sizing.hugepages_for(size))
    before = free_pages()
    agent = start_agent(tmp_path / "a", pki_files, gguf_100m,
                        model_server={"hugepages": "stage", "hugepages_mount": str(mount_dir)})
    try:
        model = agent.wait_ready(180)["model"]
        pages = model["hugepages"]
        assert pages["staged"] is True and pages["fallback_reason"] is None, pages
        in_use = model["model_file_in_use"]
        assert Path(in_use).parent == mount_dir and staging.is_hugetlbfs(in_use) and pages["on_hugetlbfs"]
        assert f"-m {in_use}" in " ".join(model["command"])
        # the kernel's own word: the weight mapping uses 2 MiB pages, and the pool lost exactly the model
        assert smaps_page_sizes(model["pid"], in_use) == {2048}
        assert pages["kernel_page_sizes_kib"] == [2048] and pages["hugepages_effective"] is True
        assert pages["hugepages_used"] == expected_pages == pages["pages"]
        assert before - free_pages() == expected_pages
        assert pages["weights_pinned"] is True
        assert model["memory"]["model_hugetlb_rss_kib"] > 0

        # the model server dies: the restart reuses the staged copy (no second copy, no extra pages)
        old_pid = model["pid"]
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: (m := agent.status()["model"])["state"] == "ready" and m["pid"] not in (None, old_pid),
                 120, 0.3, "the restarted model server")
        pages = agent.status()["model"]["hugepages"]
        assert pages["staged"] is True and pages["reused"] is True
        assert before - free_pages() == expected_pages
    finally:
        agent.stop()
    # stop: the copy is removed, its pages are back, and the agent unmounted what it mounted
    assert free_pages() == before
    assert not staging.is_hugetlbfs(mount_dir)
    assert not (tmp_path / "a" / "state" / staging.SIDECAR).exists()


def test_too_few_pages_serves_the_disk_file_and_status_says_why(tmp_path, pki_files, gguf_100m,  # noqa: F811
                                                                llama_server_binary, pool, mount_dir):  # noqa: F811
    need = math.ceil(gguf_100m.stat().st_size / PAGE)
    free = pool(need // 2)
    agent = start_agent(tmp_path / "a", pki_files, gguf_100m,
                        model_server={"hugepages": "stage", "hugepages_mount": str(mount_dir)})
    try:
        model = agent.wait_ready(180)["model"]
        pages = model["hugepages"]
        assert pages["staged"] is False and pages["on_hugetlbfs"] is False
        assert model["model_file_in_use"] == str(gguf_100m)
        reason = pages["fallback_reason"]
        assert f"need {need} pages of 2048 kB" in reason and f"{free} free" in reason, reason
        assert model["memory"]["model_page_sizes_kib"] == [4]
        assert free_pages() == free  # nothing was taken from the pool
        assert "serving the on-disk model file" in "\n".join(model["log_tail"])
        # a chat completion works on the fallback
        with agent.client() as c:
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "model": "tiny"})
        assert r.status_code == 200, r.text
    finally:
        agent.stop()
    assert not staging.is_hugetlbfs(mount_dir)


def test_staging_reuses_identical_copies_and_replaces_a_changed_model(tmp_path, pool, mount_dir):
    state = tmp_path / "state"
    a = write_model_file(tmp_path, "tiny", "Q8_0")
    b = write_model_file(tmp_path, "tiny", "Q4_0")
    pool(8)
    assert staging.ensure_mount(mount_dir) is True
    before = free_pages()
    first = staging.stage(a, mount_dir, state, file_sha256(a, state))
    assert not first.reused and before - free_pages() == first.pages == 1
    assert staging.stage(a, mount_dir, state, file_sha256(a, state)).reused is True
    # a different model: the old copy goes, the new one comes, the pool holds only one
    second = staging.stage(b, mount_dir, state, file_sha256(b, state))
    assert not Path(first.path).exists() and Path(second.path).exists() and not second.reused
    assert before - free_pages() == second.pages
    # a source whose hash is not the recorded one is never served from huge pages
    with pytest.raises(staging.StagingError, match="sha256"):
        staging.stage(a, mount_dir, state, "0" * 64)
    assert [p.name for p in mount_dir.iterdir()] == []
    staging.release(state, mount_dir)
    assert free_pages() == before


def test_unprivileged_agent_needs_the_rollouts_mount(tmp_path):
    """Without root the agent cannot mount: it says so (the caller falls back), it does not crash."""
    code = ("import os; from clawbot.model import staging\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"try:\n  staging.ensure_mount({str(tmp_path / 'hp')!r})\n"
            "except staging.StagingError as e: print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused:" in out.stdout and "not a hugetlbfs mount" in out.stdout, out.stdout + out.stderr


def test_rollout_mounts_hugetlbfs_for_the_agent_where_its_sandbox_can_write():
    """The unprivileged service can only stage into a mount the rollout made: owned by its user, 2M pages,
    outside /dev (PrivateDevices=yes hides /dev), and in the unit's ReadWritePaths (ProtectSystem=strict)."""
    from clawbot.common.config import defaults
    from roles.hugepages import fstab_line
    from roles.services import Service, systemd_unit

    mount = defaults()["model_server"]["hugepages_mount"]
    assert not mount.startswith("/dev/")
    assert fstab_line(mount, "clawbot").split() == [
        "clawbot-hugepages", mount, "hugetlbfs", "uid=clawbot,gid=clawbot,mode=0700,pagesize=2M", "0", "0"]
    unit = systemd_unit(Service("clawbot-model", "d", "/bin/true", "clawbot", ("/var/lib/clawbot", mount)))
    assert "PrivateDevices=yes" in unit and "ProtectSystem=strict" in unit
    assert f"-{mount}" in next(line for line in unit.splitlines() if line.startswith("ReadWritePaths="))


_CONVERGE = r"""
import json, os, sys
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops
import roles.hugepages as hp
hp.FSTAB = sys.argv[1]
state = State(inventory=Inventory((["@local"], {})), config=Config())
connect_all(state)
add_deploy(state, hp.ensure_hugetlbfs_mount, sys.argv[2], sys.argv[3], os.path.isdir("/run/systemd/system"))
run_ops(state)
host = next(iter(state.inventory.iter_activated_hosts()))
metas = [op.operation_meta for op in state.ops[host].values()]
print(json.dumps({"changed": sum(m.did_change() for m in metas),
                  "failed": sum(not m.did_succeed(_raise_if_not_complete=False) for m in metas)}))
"""


def test_rollout_mount_ops_converge_and_rerun_with_zero_changes(tmp_path, mount_dir):
    """pyinfra on this machine (@local), with a scratch fstab: first run mounts, a re-run changes nothing; another
    owner replaces the line and mounts again (hugetlbfs ignores a remount's uid/gid), then converges too."""
    fstab = tmp_path / "fstab"
    fstab.write_text("# scratch fstab\nUUID=x / ext4 defaults 0 1\nold %s tmpfs defaults 0 0\n"
                     "#clawbot-hugepages %s hugetlbfs uid=old 0 0\n" % (mount_dir, mount_dir))
    repo = Path(__file__).resolve().parents[1]

    def converge(user: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _CONVERGE, str(fstab), str(mount_dir), user], cwd=repo,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def owner() -> str:
        return subprocess.run(["stat", "-c", "%U:%G:%a", str(mount_dir)], capture_output=True, text=True).stdout.strip()

    assert converge("daemon") == {"changed": 2, "failed": 0}  # the fstab line, the mount
    assert staging.is_hugetlbfs(mount_dir) and owner() == "daemon:daemon:700"
    lines = fstab.read_text().splitlines()
    assert lines[:2] == ["# scratch fstab", "UUID=x / ext4 defaults 0 1"] and len(lines) == 4
    assert lines[2].split() == [
        "clawbot-hugepages", str(mount_dir), "hugetlbfs", "uid=daemon,gid=daemon,mode=0700,pagesize=2M", "0", "0"]
    assert lines[3].startswith("#")  # a commented line is not the mount point's line
    assert converge("daemon") == {"changed": 0, "failed": 0}
    assert converge("bin") == {"changed": 2, "failed": 0}
    assert owner() == "bin:bin:700" and "uid=bin,gid=bin" in fstab.read_text().splitlines()[2]
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1] == str(mount_dir)]
    assert len(mounts) == 1, mounts  # unmounted, then mounted again: not stacked
    assert converge("bin") == {"changed": 0, "failed": 0}


class _ShellHost:
    """Just enough of a pyinfra host to run a stock operation here: facts run through sh (no root, no pyinfra
    state), commands are collected for the caller to run."""

    def __init__(self):
        self.noop_description = None

    def noop(self, description: str) -> None:
        self.noop_description = description

    def get_fact(self, fact_cls, **kwargs):
        fact = fact_cls()
        done = subprocess.run(["/bin/sh", "-c", str(fact.command(**kwargs).get_raw_value())], capture_output=True,
                              text=True, timeout=30)
        lines = done.stdout.splitlines()
        return fact.process(lines) if done.returncode == 0 and lines else fact.default()


def test_fstab_line_replaces_only_its_mount_points_line(tmp_path):
    """The stock files.line with roles.hugepages' regex: the mount point's own line is replaced in place, a
    commented line, a longer path and a path with regex characters are left alone; a second pass is a noop."""
    from pyinfra.api import Config
    from pyinfra.context import ctx_host, ctx_state
    from pyinfra.operations import files

    from roles.hugepages import fstab_line, fstab_match

    path = "/srv/clawbot.x/hugepages"
    fstab = tmp_path / "fstab"
    others = ["# /srv/clawbot.x/hugepages was tmpfs", "#tmpfs /srv/clawbot.x/hugepages tmpfs defaults 0 0",
              "tmpfs /srv/clawbot.x/hugepages2 tmpfs defaults 0 0", "tmpfs /srv/clawbotyx/hugepages tmpfs defaults 0 0"]
    fstab.write_text("\n".join([others[0], f"tmpfs\t{path}\ttmpfs defaults 0 0", *others[1:]]) + "\n")

    def apply() -> tuple[list[str], str | None]:
        host = _ShellHost()
        state = type("State", (), {"config": Config()})()
        with ctx_state.use(state), ctx_host.use(host):
            commands = [c.get_raw_value() for c in files.line._inner(
                path=str(fstab), line=fstab_match(path), replace=fstab_line(path, "clawbot"), extended_regex=True)]
        for command in commands:
            subprocess.run(["/bin/sh", "-c", command], check=True, timeout=30)
        return commands, host.noop_description

    assert apply()[0]
    assert fstab.read_text().splitlines() == [others[0], fstab_line(path, "clawbot"), *others[1:]]
    assert apply() == ([], f'line "{fstab_line(path, "clawbot")}" exists in {fstab}')
    fstab.write_text("UUID=x / ext4 defaults 0 1\n")  # no line yet: appended
    apply()
    assert fstab.read_text().splitlines() == ["UUID=x / ext4 defaults 0 1", fstab_line(path, "clawbot")]
