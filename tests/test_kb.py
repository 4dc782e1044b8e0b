"""`clawbot kb add|list|remove`: documents copied into the knowledge directory and indexed into the chat node's
real SQLite FTS5 index; bad input is refused with the file named, exit 1, and nothing changed. The last tests run
a real chat agent (model node down) that answers from the starter documents deploy installs and sees `kb`
changes while it runs.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from clawbot.common.config import check_bytes
from fixtures_chat import ChatAgent, chat_config, chat_pki, clawbot_command, free_port, running, send  # noqa: F401
from fixtures_documents import converge_knowledge_base, encrypted_pdf, make_pdf

ROUTER = "# Home router\n\nThe router sits in the hallway cupboard.\n\n## Factory reset\n\nHold the reset button for ten seconds.\n"
PRINTER = "The office printer takes A4 paper only.\n\nToner cartridges are in the second drawer.\n"
BOILER = [["The boiler room key hangs on the hook by the cellar door."], ["The garden shed code is 4711."]]


@pytest.fixture
def node(tmp_path):
    """A chat node's clawbot.json (knowledge directory and database in tmp_path) and the documents to add."""
    config = tmp_path / "clawbot.json"
    config.write_text(json.dumps({
        "model_gateway": {"endpoint": "https://localhost:5999"},
        "fallback_strategies": ["knowledge_base"],
        "chat": {"database": str(tmp_path / "state" / "chat.sqlite3"),
                 "knowledge_base": {"directory": str(tmp_path / "knowledge"), "max_passages": 3}},
    }))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "router.md").write_text(ROUTER)
    (docs / "printer.txt").write_text(PRINTER)
    (docs / "boiler.pdf").write_bytes(make_pdf(BOILER))
    return config


def kb(config: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(clawbot_command() + ["kb", "--config", str(config), *argv], capture_output=True, text=True,
                          timeout=120)


def index(config: Path) -> dict[str, list[tuple[str, str]]]:
    """What the chat agent would search: {source: [(heading, passage)]}, read straight from the SQLite file."""
    database = json.loads(config.read_text())["chat"]["database"]
    if not Path(database).exists():
        return {}
    with sqlite3.connect(database) as db:
        files = {row[0] for row in db.execute("SELECT path FROM kb_files")}
        found: dict[str, list] = {path: [] for path in files}
        for source, heading, content in db.execute("SELECT source, heading, content FROM kb_passages ORDER BY rowid"):
            found.setdefault(source, []).append((heading, content))
    return found


def snapshot(config: Path) -> tuple:
    directory = Path(json.loads(config.read_text())["chat"]["knowledge_base"]["directory"])
    files = sorted((str(p.relative_to(directory)), p.read_bytes()) for p in directory.rglob("*") if p.is_file()) \
        if directory.exists() else None
    return files, index(config)


def test_add_list_remove_markdown_text_and_pdf(node):
    docs = node.parent / "docs"
    added = kb(node, "add", str(docs / "router.md"), str(docs / "printer.txt"), str(docs / "boiler.pdf"))
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == ["added router.md: 2 passage(s)", "added printer.txt: 2 passage(s)",
                                         "added boiler.pdf: 2 passage(s)"]
    knowledge = node.parent / "knowledge"
    assert (knowledge / "router.md").read_text() == ROUTER and (knowledge / "boiler.pdf").read_bytes() == make_pdf(BOILER)
    found = index(node)
    assert found["router.md"] == [("Home router", "The router sits in the hallway cupboard."),
                                  ("Home router › Factory reset", "Hold the reset button for ten seconds.")]
    assert found["boiler.pdf"] == [("boiler › page 1", "The boiler room key hangs on the hook by the cellar door."),
                                   ("boiler › page 2", "The garden shed code is 4711.")]

    listed = kb(node, "--json", "list")
    assert listed.returncode == 0, listed.stderr
    body = json.loads(listed.stdout)
    assert [(d["path"], d["passages"]) for d in body["documents"]] == [("boiler.pdf", 2), ("printer.txt", 2),
                                                                        ("router.md", 2)]
    assert body["not_indexed"] == [] and body["problem"] is None
    text = kb(node, "list").stdout
    assert "3 document(s), 6 passage(s)" in text and "boiler.pdf" in text

    removed = kb(node, "remove", "printer.txt")
    assert removed.returncode == 0 and removed.stdout.strip() == "removed printer.txt", removed.stderr
    assert not (knowledge / "printer.txt").exists() and set(index(node)) == {"router.md", "boiler.pdf"}


def test_replace_reindexes_and_adding_a_file_already_there_indexes_it(node):
    docs = node.parent / "docs"
    assert kb(node, "add", str(docs / "router.md")).returncode == 0
    (docs / "router.md").write_text("# Home router\n\nIt moved to the attic.\n")
    refused = kb(node, "add", str(docs / "router.md"))
    assert refused.returncode == 1 and "already in the knowledge base; pass --replace" in refused.stderr
    assert index(node)["router.md"][0][1] == "The router sits in the hallway cupboard."
    assert kb(node, "add", "--replace", str(docs / "router.md")).returncode == 0
    assert index(node)["router.md"] == [("Home router", "It moved to the attic.")]
    # a file copied into the directory by hand: `add` of that very file indexes it in place
    knowledge = node.parent / "knowledge"
    (knowledge / "faq.md").write_text("# FAQ\n\nCoffee is free.\n")
    done = kb(node, "add", str(knowledge / "faq.md"))
    assert done.returncode == 0, done.stderr
    assert index(node)["faq.md"] == [("FAQ", "Coffee is free.")]


BAD = {
    "missing": (lambda d: d / "nothere.md", "nothere.md: no such file"),
    "unsupported type": (lambda d: _write(d / "report.docx", b"PK\x03\x04"), "report.docx: unsupported type '.docx'"),
    "no suffix": (lambda d: _write(d / "README", b"hello"), "README: unsupported type '(no suffix)'"),
    "a directory": (lambda d: _mkdir(d / "folder.md"), "folder.md: not a regular file"),
    "not a PDF": (lambda d: _write(d / "fake.pdf", b"this is not a PDF at all"), "fake.pdf: not a readable PDF"),
    "truncated PDF": (lambda d: _write(d / "cut.pdf", make_pdf(BOILER)[:200]), "cut.pdf: not a readable PDF"),
    "encrypted PDF": (lambda d: _write(d / "locked.pdf", encrypted_pdf(BOILER, "s3cret")),
                      "locked.pdf: the PDF is encrypted with a password"),
    "scanned PDF": (lambda d: _write(d / "scan.pdf", make_pdf([[]])), "scan.pdf: no text could be extracted"),
    "not UTF-8": (lambda d: _write(d / "latin1.txt", "line one\nCaf\xe9\n".encode("latin-1")),
                  "latin1.txt: line 2: not UTF-8 text (byte 0xe9"),
    "empty": (lambda d: _write(d / "empty.md", b"\n\n"), "empty.md: no text in it"),
    "hidden": (lambda d: _write(d / ".secret.md", b"x"), ".secret.md: hidden files are not indexed"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_the_file_named_and_changes_nothing(node, case):
    """A good document given together with the bad one is not added either: every file is read first."""
    docs = node.parent / "docs"
    assert kb(node, "add", str(docs / "printer.txt")).returncode == 0
    before = snapshot(node)
    make, message = BAD[case]
    bad = make(docs)
    done = kb(node, "add", str(docs / "router.md"), str(bad))
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr and "nothing was added" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert snapshot(node) == before


def test_two_files_of_one_name_are_refused(node, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "router.md").write_text("# Another router\n\nElsewhere.\n")
    done = kb(node, "add", str(tmp_path / "docs" / "router.md"), str(other / "router.md"))
    assert done.returncode == 1 and "same name as" in done.stderr
    assert snapshot(node) == (None, {})


def test_remove_refuses_unknown_names_escapes_and_starter_documents(node):
    docs = node.parent / "docs"
    knowledge = node.parent / "knowledge"
    assert kb(node, "add", str(docs / "router.md")).returncode == 0
    (knowledge / "clawbot").mkdir()
    (knowledge / "clawbot" / "accounts.md").write_text("# Accounts\n\nAsk an administrator.\n")
    before = snapshot(node)
    for names, message in ((["nothere.md"], "nothere.md: no such document"),
                           (["router.md", "nothere.md"], "nothere.md: no such document"),
                           (["../clawbot.json"], "name a document as `clawbot kb list` shows it"),
                           (["/etc/passwd"], "name a document as `clawbot kb list` shows it"),
                           (["clawbot/accounts.md"], "a starter document; deploy installs it")):
        done = kb(node, "remove", *names)
        assert done.returncode == 1 and message in done.stderr and "nothing was removed" in done.stderr, done.stderr
        assert snapshot(node) == before
    assert (knowledge / "router.md").exists() and "router.md" in index(node)


def test_list_rescans_and_names_what_it_cannot_index(node):
    knowledge = node.parent / "knowledge"
    knowledge.mkdir()
    (knowledge / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (knowledge / "ok.md").write_text("# Ok\n\nFine.\n")
    body = json.loads(kb(node, "--json", "list").stdout)
    assert [(d["path"], d["passages"]) for d in body["documents"]] == [("ok.md", 1)]
    assert [item["path"] for item in body["not_indexed"]] == ["broken.pdf"]
    assert "broken.pdf: not a readable PDF" in body["not_indexed"][0]["reason"]
    (knowledge / "ok.md").unlink()
    text = kb(node, "list").stdout
    assert "not indexed: broken.pdf: not a readable PDF" in text
    assert "the knowledge_base fallback cannot answer: no documents indexed" in text


def test_unusable_config_exits_78_and_names_it(tmp_path):
    bad = tmp_path / "clawbot.json"
    bad.write_text('{"chat": {"knowledge_base": {"directory": "relative/kb"}}}')
    done = kb(bad, "list")
    assert done.returncode == 78 and f"{bad} is not usable" in done.stderr and "/chat/knowledge_base/directory" in done.stderr


def test_as_root_it_reads_as_root_and_writes_as_the_database_owner(tmp_path):
    """Run as root (as an admin does with sudo on the chat node): a source only root can read is still added, and
    the copy and the database belong to the agent's user (here `daemon`), never to root."""
    assert os.geteuid() == 0, "the test suite runs as root (README: Tests)"
    node_dir = Path(tempfile.mkdtemp(prefix="clawbot-kb-"))  # tmp_path's parents are root-only: daemon could not enter
    try:
        node_dir.chmod(0o755)
        state, knowledge = node_dir / "state", node_dir / "knowledge"
        for directory in (state, knowledge):
            directory.mkdir()
            shutil.chown(directory, "daemon", "daemon")
            directory.chmod(0o750)
        config = node_dir / "clawbot.json"
        config.write_text(json.dumps({"model_gateway": {"endpoint": "https://localhost:5999"},
                                      "chat": {"database": str(state / "chat.sqlite3"),
                                               "knowledge_base": {"directory": str(knowledge)}}}))
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        (private / "router.md").write_text(ROUTER)
        done = kb(config, "add", str(private / "router.md"))
        assert done.returncode == 0, done.stderr
        daemon = pwd.getpwnam("daemon").pw_uid
        owners = {str(path.relative_to(node_dir)): path.stat().st_uid for path in [knowledge / "router.md", *state.iterdir()]}
        assert "state/chat.sqlite3" in owners and set(owners.values()) == {daemon}, owners
        assert index(config)["router.md"][0] == ("Home router", "The router sits in the hallway cupboard.")
    finally:
        shutil.rmtree(node_dir)


# ---------------------------------------------------------------------------------------------- with a chat agent


def dead_endpoint() -> str:
    return f"https://localhost:{free_port()}"


def test_model_down_the_starter_documents_answer_how_to_get_an_account(chat_pki, tmp_path):
    """Deploy's own knowledge-base step (pyinfra @local) fills the directory; the chat agent, its model node down,
    answers "How do I get an account?" from the starter documents, labelled knowledge_base. Then `clawbot kb`
    adds a PDF and removes it while the agent runs, and the agent's answers follow."""
    from roles.chat import starter_documents, starter_facts

    knowledge = tmp_path / "knowledge"
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=knowledge)
    checked = check_bytes(json.dumps(config).encode(), "chat.json").config
    documents = starter_documents(starter_facts(checked, "clawbot-local", [("127.0.0.1", ["clawbot-local"])], "admin"))
    assert converge_knowledge_base(knowledge, documents, "root", tmp_path)["failed"] == 0
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        message = send(c, conv["id"], "How do I get an account?").message
        assert message["source"] == "knowledge_base" and message["status"] == "complete", message
        assert message["meta"]["citations"][0] == {"source": "clawbot/accounts.md",
                                                   "heading": "Accounts › How do I get an account?"}
        assert "Ask an administrator of this chat to create an account for you" in message["content"]
        assert "`clawbot users add NAME`" in message["content"]

        pdf = tmp_path / "boiler.pdf"
        pdf.write_bytes(make_pdf(BOILER))
        added = agent_kb(agent, "add", str(pdf))
        assert added.returncode == 0, added.stderr
        answer = poll_answer(c, conv["id"], "Where does the boiler room key hang?",
                             lambda m: m["source"] == "knowledge_base" and m["meta"]["citations"][0]["source"] == "boiler.pdf")
        assert "hook by the cellar door" in answer["content"]
        assert answer["meta"]["citations"][0] == {"source": "boiler.pdf", "heading": "boiler › page 1"}

        removed = agent_kb(agent, "remove", "boiler.pdf")
        assert removed.returncode == 0, removed.stderr
        gone = poll_answer(c, conv["id"], "Where does the boiler room key hang?",
                           lambda m: all(cite["source"] != "boiler.pdf" for cite in m["meta"].get("citations", [])))
        assert "cellar door" not in gone["content"]
        listed = json.loads(agent_kb(agent, "--json", "list").stdout)
        assert {d["path"] for d in listed["documents"]} == {f"clawbot/{name}" for name in documents}


def agent_kb(agent: ChatAgent, *argv: str) -> subprocess.CompletedProcess:
    """`clawbot kb --config <the agent's config> ARGV`, as an admin runs it on the chat node."""
    return kb(agent.config_path, *argv)


def poll_answer(client, conv_id: str, question: str, done, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        message = send(client, conv_id, question).message
        if done(message):
            return message
        assert time.monotonic() < deadline, f"no such answer after {timeout_s} s: {message}"
        time.sleep(0.5)
