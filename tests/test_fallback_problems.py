"""A configured fallback that cannot answer is named: at run time by `Fallbacks.problems()` (what /api/status
reports as fallback_problems), before a rollout by `clawbot validate --inventory` (a warning, exit 0).

problems() runs against real directories and a real SQLite store; validate runs as the CLI on real inventories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clawbot.chat.fallbacks import Fallbacks, KnowledgeBase, WebSearch
from clawbot.chat.store import Store
from clawbot.common.config import check_bytes
from fixtures_documents import make_pdf


def fallbacks(tmp_path, strategies, directory: Path, endpoint: str = "") -> Fallbacks:
    store = Store(tmp_path / "chat.sqlite3")
    return Fallbacks(strategies, KnowledgeBase(store, str(directory), 3, rescan_interval_s=0),
                     WebSearch(endpoint, 5, 3))


def test_nothing_configured_has_no_problem(tmp_path):
    assert fallbacks(tmp_path, [], tmp_path / "missing").problems() == []


def test_knowledge_base_directory_missing_then_empty_then_answering(tmp_path):
    directory = tmp_path / "knowledge"
    f = fallbacks(tmp_path, ["knowledge_base"], directory)
    assert f.problems() == [f"knowledge_base: directory {directory} does not exist (deploy creates it; add documents "
                            "with `clawbot kb add`)"]
    directory.mkdir()
    assert f.problems() == [f"knowledge_base: no documents indexed in {directory}: add some with `clawbot kb add`"]
    (directory / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    assert f.problems() == [f"knowledge_base: no documents indexed in {directory} (1 file(s) could not be read): "
                            "add some with `clawbot kb add`"]
    (directory / "guide.pdf").write_bytes(make_pdf([["The spare keys are in the blue box."]]))
    assert f.problems() == []
    answer, _ = f.knowledge_base.answer("Where are the spare keys?")
    assert answer is not None and answer.citations == [{"source": "guide.pdf", "heading": "guide › page 1"}]
    (directory / "guide.pdf").unlink()
    assert f.problems()[0].startswith("knowledge_base: no documents indexed")


def test_knowledge_base_path_that_is_a_file(tmp_path):
    path = tmp_path / "knowledge"
    path.write_text("not a directory")
    assert fallbacks(tmp_path, ["knowledge_base"], path).problems() == [f"knowledge_base: {path} is not a directory"]


def as_nobody(call):
    """call() in a forked child running as `nobody` (as an agent's user would; root may read everything), its
    JSON-able result back through a pipe."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, report, leave without running pytest's teardown
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write, json.dumps(call()).encode())
        except BaseException as exc:  # shown by the parent's assertion
            os.write(write, json.dumps(repr(exc)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found = json.loads(pipe.read() or "null")
    assert os.waitpid(pid, 0)[1] == 0
    return found


def test_knowledge_base_directory_the_agent_user_cannot_read_or_reach(tmp_path):
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="clawbot-kb-"))  # nobody may enter it, not the root-only directory in it
    try:
        top.chmod(0o755)
        directory = top / "knowledge"
        directory.mkdir(mode=0o700)
        (directory / "a.md").write_text("# A\n\nsomething\n")
        f = fallbacks(tmp_path, ["knowledge_base"], directory)
        assert as_nobody(f.problems) == [f"knowledge_base: directory {directory} is not readable by this agent's user"]
        assert f.problems() == []  # root reads it
        hidden = fallbacks(tmp_path, ["knowledge_base"], directory / "inner")
        directory.joinpath("inner").mkdir()
        assert as_nobody(hidden.problems) == [
            f"knowledge_base: directory {directory / 'inner'} cannot be reached by this agent's user (Permission denied)"]
        # answering says the same instead of raising PermissionError in the chat agent
        assert as_nobody(lambda: hidden.knowledge_base.answer("anything")) == [
            None, f"knowledge base directory {directory / 'inner'} cannot be reached by this agent's user (Permission denied)"]
    finally:
        shutil.rmtree(top)


def test_web_search_without_endpoint_and_the_configured_order(tmp_path):
    directory = tmp_path / "missing"
    f = fallbacks(tmp_path, ["web_search", "knowledge_base"], directory)
    assert [p.split(":", 1)[0] for p in f.problems()] == ["web_search", "knowledge_base"]
    assert f.problems()[0] == "web_search: no endpoint set (chat.web_search.endpoint is empty)"
    # an endpoint is not probed: it may answer
    assert fallbacks(tmp_path, ["web_search"], directory, "https://search.lab/search").problems() == []


def test_from_config_with_the_default_config_names_the_default_directory(tmp_path):
    config = check_bytes(b'{"model_gateway": {"endpoint": "https://m:5000"}, "fallback_strategies": ["knowledge_base"]}',
                         "c.json").config
    found = Fallbacks.from_config(config, Store(tmp_path / "chat.sqlite3")).problems()
    assert len(found) == 1 and "/var/lib/clawbot/knowledge" in found[0]


# ---------------------------------------------------------------------------------------------- validate --inventory


@pytest.fixture
def inventory(tmp_path):
    root = tmp_path / "inv"
    (root / ".clawbot").mkdir(parents=True)
    (root / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            chat_nodes:
              hosts:
                chat-a:
                  ansible_host: 10.9.0.10
            model_nodes:
              hosts:
                model-a:
                  ansible_host: 10.9.0.20
        """))
    return root


def validate(inventory: Path, config: dict, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    path = inventory / ".clawbot" / "clawbot.json"
    path.write_text(json.dumps({"model_gateway": {"endpoint": "https://10.9.0.20:5000"}, **config}, indent=2))
    done = subprocess.run([sys.executable, "-m", "clawbot", "validate", *extra, "--inventory", str(inventory), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done, path


def warnings(done) -> list[str]:
    return [line for line in done.stdout.splitlines() if ": warning: " in line]


def test_default_knowledge_base_gets_no_warning(inventory):
    done, _ = validate(inventory, {"fallback_strategies": ["knowledge_base"]})
    assert done.returncode == 0 and warnings(done) == [], done.stdout + done.stderr
    assert "0 warning(s)" in done.stderr


def test_web_search_without_endpoint_is_a_warning_with_the_inventory(inventory):
    done, path = validate(inventory, {"fallback_strategies": ["web_search"]})
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = warnings(done)
    assert line.startswith(f"{path}:6:5: warning: /fallback_strategies/0: web_search is listed but "
                           "chat.web_search.endpoint is not set")


def test_knowledge_directory_hidden_by_the_systemd_unit_is_a_warning_at_its_value(inventory):
    done, path = validate(inventory, {"fallback_strategies": ["knowledge_base"],
                                      "chat": {"knowledge_base": {"directory": "/home/alice/kb"}}})
    assert done.returncode == 0, done.stdout + done.stderr
    assert warnings(done) == [
        f"{path}:10:20: warning: /chat/knowledge_base/directory: knowledge_base (fallback_strategies/0) cannot work on "
        "chat-a: chat.knowledge_base.directory /home/alice/kb is under /home, which the chat agent's systemd unit "
        "hides from it (ProtectHome=yes): it would see no documents (use a directory of its own, such as "
        "/var/lib/clawbot/knowledge (the default))"]
    github, _ = validate(inventory, {"fallback_strategies": ["knowledge_base"],
                                     "chat": {"knowledge_base": {"directory": "/tmp/kb"}}}, "--format", "github")
    assert github.returncode == 0
    assert github.stdout.startswith(f"::warning file={path},line=10,col=20,") and "PrivateTmp=yes" in github.stdout


def test_under_supervisor_home_is_visible(inventory):
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "all.yml").write_text("clawbot_service_manager: supervisor\n")
    done, _ = validate(inventory, {"fallback_strategies": ["knowledge_base"],
                                   "chat": {"knowledge_base": {"directory": "/home/alice/kb"}}})
    assert done.returncode == 0 and warnings(done) == [], done.stdout


@pytest.mark.parametrize("directory, words", [
    ("/opt/clawbot/knowledge", "overlaps /opt/clawbot (clawbot_prefix), which deploy keeps owned by root"),
    ("/etc/clawbot/kb", "overlaps /etc/clawbot (the agent's config directory)"),
    ("/var/lib", "holds /var/lib/clawbot: deploy would hand /var/lib to the agent's user"),
])
def test_knowledge_directory_that_deploy_manages_otherwise_is_a_warning(inventory, directory, words):
    done, _ = validate(inventory, {"fallback_strategies": ["knowledge_base"],
                                   "chat": {"knowledge_base": {"directory": directory}}})
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = warnings(done)
    assert words in line and "cannot work on chat-a" in line


def test_not_listed_means_not_checked(inventory):
    done, _ = validate(inventory, {"fallback_strategies": [], "chat": {"knowledge_base": {"directory": "/home/x"}}})
    assert done.returncode == 0 and warnings(done) == []


def test_a_check_that_fails_is_reported_not_raised(tmp_path):
    """A status endpoint calls problems(): a broken database shows up as a problem line, never as an exception."""
    directory = tmp_path / "knowledge"
    directory.mkdir()
    f = fallbacks(tmp_path, ["knowledge_base"], directory)
    f.knowledge_base.store.close()
    [line] = f.problems()
    assert line.startswith("knowledge_base: cannot check (ProgrammingError: ") and "closed database" in line


@pytest.mark.slow
def test_api_status_names_a_fallback_that_cannot_answer(tmp_path):
    """The chat agent's /api/status carries Fallbacks.problems() as fallback_problems (the UI shows them)."""
    from fixtures_chat import ChatAgent, chat_config, make_cluster_pki, running
    from tests.fixtures_agent import wait_for

    pki_ = make_cluster_pki(tmp_path / "pki")
    missing = tmp_path / "no-such-knowledge"
    config = chat_config(pki_, tmp_path / "chat", "https://localhost:9", fallbacks=["knowledge_base"], kb_dir=missing)
    with running(ChatAgent(config, tmp_path / "chat", pki_)) as chat, chat.client() as c:
        problems = c.get("/api/status").json()["fallback_problems"]
        assert len(problems) == 1 and problems[0].startswith("knowledge_base:") and str(missing) in problems[0]
        missing.mkdir()
        (missing / "faq.md").write_text("# FAQ\n\nAsk the administrator for an account.\n")
        wait_for(lambda: c.get("/api/status").json()["fallback_problems"] == [], 30,
                 what="the knowledge base answering once a document is there")
