"""Deploy's side of the knowledge base (roles/chat.py): the directory, owned by the agent's user, and the starter
documents rendered from the inventory; a re-run changes nothing, and the users' own documents are never touched.

The convergence test runs the real deploy (pyinfra @local, stock files.directory / files.put) against a scratch
directory on this machine, as test_hugepages.py does for the mount; the rendering tests call the role's helpers.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import types

import pytest

from clawbot.common.config import check_bytes
from roles.chat import STARTER_DOCUMENTS, knowledge_base_plan, starter_documents, starter_facts
from tests.fixtures_documents import converge_knowledge_base


def config(**overrides) -> dict:
    document = {"model_gateway": {"endpoint": "https://model-a:5000"}, "fallback_strategies": ["knowledge_base"]}
    document.update(overrides)
    result = check_bytes(json.dumps(document).encode(), "clawbot.json")
    assert result.ok, [d.text() for d in result.diagnostics]
    return result.config


def owner_mode(path) -> tuple[str, str, str]:
    st = os.stat(path)
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, oct(stat.S_IMODE(st.st_mode))[2:]


def test_every_starter_template_renders_and_keeps_no_placeholder():
    documents = starter_documents(starter_facts(config(), "chat-a", [("10.9.0.10", ["chat-a"])], "admin"))
    assert set(documents) == {p.name for p in STARTER_DOCUMENTS.glob("*.md")} and len(documents) >= 4
    for name, text in documents.items():
        assert "$" not in text, f"{name}: a placeholder was left: {text}"
        assert text.startswith("# "), f"{name}: starts with its title"
    joined = "\n".join(documents.values())
    for fact in ("https://chat-a:8443/", "https://10.9.0.10:8443/", "https://chat-a:8443/v1", "`admin`",
                 "clawbot users add NAME", "clawbot users add-key NAME", "clawbot kb add"):
        assert fact in joined, fact


def test_a_template_with_an_unknown_placeholder_fails_on_the_control_machine():
    with pytest.raises(ValueError, match=r"accounts\.md: placeholder \$admin_contact has no value"):
        starter_documents({"other_urls": ""})


def test_local_node_is_reached_as_localhost_and_names_no_address():
    facts = starter_facts(config(), "clawbot-local", [("127.0.0.1", ["clawbot-local"])], "admin")
    assert facts["chat_url"] == "https://localhost:8443/" and facts["other_urls"] == ""
    assert facts["api_url"] == "https://localhost:8443/v1"


def test_facts_follow_the_config():
    sso = config(auth={"oidc": {"enabled": True, "issuer": "https://sso.lab", "client_id": "clawbot"}},
                 chat={"port": 9443}, fallback_strategies=["web_search", "knowledge_base"])
    facts = starter_facts(sso, "chat-a", [("10.9.0.10", ["chat-a", "chat.lab"])], "ops")
    assert facts["chat_url"] == "https://chat-a:9443/" and "Sign in with SSO" in facts["sso_option"]
    assert "first SSO sign-in creates your account" in facts["sso_accounts"] and "`ops`" in facts["admin_contact"]
    behaviour = facts["fallback_behaviour"]
    assert behaviour.index("web search") < behaviour.index("knowledge base"), behaviour
    none = starter_facts(config(fallback_strategies=[]), "chat-a", [], None)
    assert "no fallback is configured" in none["fallback_behaviour"] and none["sso_option"] == ""
    assert "the administrator account deploy created" in none["admin_contact"]


def test_plan_gives_the_configured_directory_and_the_admin_of_the_inventory(tmp_path):
    node_config = tmp_path / "clawbot.json"
    node_config.write_text(json.dumps({"model_gateway": {"endpoint": "https://model-a:5000"},
                                       "chat": {"knowledge_base": {"directory": "/srv/kb"}}}))
    admin = tmp_path / "admin.json"
    admin.write_text(json.dumps({"name": "ops-lead", "password_hash": "$argon2id$x"}))
    plan = types.SimpleNamespace(config_file=str(node_config), name="chat-a", hosts_entries=(("10.9.0.10", ("chat-a",)),),
                                 chat_files=((str(admin), "/etc/clawbot/admin.json"),))
    directory, documents = knowledge_base_plan(plan)
    assert directory == "/srv/kb"
    assert "`ops-lead`" in documents["accounts.md"] and "https://chat-a:8443/" in documents["welcome.md"]


def test_deploy_creates_the_directory_for_the_agent_and_never_touches_users_documents(tmp_path):
    """First run: the directory, its clawbot/ sub-folder and the starter files, owned by the agent's user. A re-run
    changes nothing; a drifted starter file is put back; the users' own files (beside and inside clawbot/) keep
    their bytes and their mtime through every run."""
    directory = tmp_path / "var" / "lib" / "clawbot" / "knowledge"
    documents = starter_documents(starter_facts(config(), "chat-a", [("10.9.0.10", ["chat-a"])], "admin"))
    first = converge_knowledge_base(directory, documents, "daemon", tmp_path)
    assert first == {"changed": 2 + len(documents), "failed": 0}
    assert owner_mode(directory) == ("daemon", "daemon", "750")
    assert owner_mode(directory / "clawbot") == ("daemon", "daemon", "750")
    for name, text in documents.items():
        assert (directory / "clawbot" / name).read_text() == text
        assert owner_mode(directory / "clawbot" / name) == ("daemon", "daemon", "640")

    mine = directory / "handbook.md"
    mine.write_text("# Handbook\n\nOur own words.\n")
    beside = directory / "clawbot" / "notes.md"
    beside.write_text("kept too\n")
    os.utime(mine, ns=(1_000_000_000, 1_000_000_000))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (mine, beside)}
    assert converge_knowledge_base(directory, documents, "daemon", tmp_path) == {"changed": 0, "failed": 0}

    (directory / "clawbot" / "accounts.md").write_text("edited by hand\n")
    assert converge_knowledge_base(directory, documents, "daemon", tmp_path) == {"changed": 1, "failed": 0}
    assert (directory / "clawbot" / "accounts.md").read_text() == documents["accounts.md"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (mine, beside)} == before
    assert converge_knowledge_base(directory, documents, "daemon", tmp_path) == {"changed": 0, "failed": 0}
    assert sorted(p.name for p in directory.iterdir()) == ["clawbot", "handbook.md"]

