"""Answers when the model is unavailable: local knowledge base (SQLite FTS5) and web search (SearxNG JSON).

Tried in the order of `fallback_strategies`. Each strategy returns an `Answer` (text + citations +
source label) or None with a reason; the reasons are logged and kept with the reply so the user sees
why the model did not answer and where the answer came from instead.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from clawbot.chat.store import Store

log = logging.getLogger("clawbot.chat.fallbacks")

KB_SUFFIXES = (".md", ".markdown", ".txt", ".pdf")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
WORD = re.compile(r"\w+", re.UNICODE)
# Words that would match almost every passage; left out of the search so the ranking means something.
STOPWORDS = frozenset("""a an and are as at be by can do does for from how i in is it me my of on or our should
the this to was we what when where which who why will with you your""".split())
MAX_PASSAGE_CHARS = 1200


@dataclass
class Answer:
    source: str  # "knowledge_base" | "web_search"
    text: str
    citations: list[dict] = field(default_factory=list)


@dataclass
class Outcome:
    answer: Answer | None
    tried: list[str]  # "<strategy>: <what happened>", in order


# ---------------------------------------------------------------------------------- knowledge base


def split_passages(text: str, title: str, markdown: bool = True) -> list[tuple[str, str]]:
    """(heading path, passage) pairs: one per paragraph, each under the headings it sits in (markdown=False:
    no headings or code fences are recognised, every passage sits under `title`)."""
    passages: list[tuple[str, str]] = []
    headings: list[str] = []
    paragraph: list[str] = []
    in_fence = False

    def flush():
        body = "\n".join(paragraph).strip()
        paragraph.clear()
        if body:
            heading = " › ".join(headings) or title
            for start in range(0, len(body), MAX_PASSAGE_CHARS):
                passages.append((heading, body[start:start + MAX_PASSAGE_CHARS]))

    for line in text.splitlines():
        if markdown and line.strip().startswith("```"):
            in_fence = not in_fence
            paragraph.append(line)
            continue
        match = None if in_fence or not markdown else HEADING.match(line)
        if match:
            flush()
            level = len(match.group(1))
            headings[level - 1:] = [match.group(2)]
            del headings[level:]
            continue
        if not line.strip() and not in_fence:
            flush()
        else:
            paragraph.append(line)
    flush()
    return passages


class DocumentError(ValueError):
    """A document that cannot be indexed; the message names the file and, where known, the line or page."""


def _utf8_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DocumentError(f"{name}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                            f"{exc.start}); convert it to UTF-8 first (e.g. iconv -t UTF-8)") from None


def _pdf_passages(data: bytes, name: str, title: str) -> list[tuple[str, str]]:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair notes are not ours to print; failures raise
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone still opens
            raise DocumentError(f"{name}: the PDF is encrypted with a password; save an unencrypted copy first")
        passages: list[tuple[str, str]] = []
        for number, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            passages += split_passages(text, f"{title} › page {number}", markdown=False)
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as exc:
        raise DocumentError(f"{name}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    if not passages and len(reader.pages):
        raise DocumentError(f"{name}: no text could be extracted from its {len(reader.pages)} page(s) "
                            "(a scanned PDF? run OCR on it first, e.g. ocrmypdf)")
    return passages


def document_passages(data: bytes, name: str, title: str, *, strict: bool = True) -> list[tuple[str, str]]:
    """(heading path, passage) pairs of one document by its suffix: Markdown and text as UTF-8, PDF with pypdf.

    strict=False (the agent's rescan) reads text that is not UTF-8 with replacement characters instead of
    refusing it. Raises DocumentError for an unsupported type, an unreadable or encrypted PDF, or (strict) text
    that is not UTF-8."""
    suffix = Path(name).suffix.lower()
    if suffix not in KB_SUFFIXES:
        raise DocumentError(f"{name}: unsupported type {suffix or '(no suffix)'!r}: the knowledge base reads "
                            + ", ".join(KB_SUFFIXES))
    if suffix == ".pdf":
        return _pdf_passages(data, name, title)
    text = _utf8_text(data, name) if strict else data.decode("utf-8", errors="replace")
    return split_passages(text, title)


class KnowledgeBase:
    """Markdown, text and PDF files of one directory, indexed into the store's FTS5 table; reindexed on change."""

    def __init__(self, store: Store, directory: str, max_passages: int, rescan_interval_s: float = 2.0):
        self.store, self.directory, self.max_passages = store, Path(directory), max_passages
        self.rescan_interval_s = rescan_interval_s
        self._scanned_at = 0.0
        # documents the last scans could not index: relative path -> ((mtime_ns, size), reason); a file is
        # tried again only when it changes, so a broken PDF is not re-parsed on every question
        self.failed: dict[str, tuple[tuple[int, int], str]] = {}

    def refresh(self, force: bool = False) -> dict:
        """Bring the index in line with the directory (new, changed and removed files). Cheap when unchanged."""
        if not force and time.monotonic() - self._scanned_at < self.rescan_interval_s:
            return {"indexed": 0, "removed": 0}
        self._scanned_at = time.monotonic()
        seen: dict[str, tuple[int, int, Path]] = {}
        if self._directory_problem() is None:
            for root, dirs, files in os.walk(self.directory):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.lower().endswith(KB_SUFFIXES) and not name.startswith("."):
                        path = Path(root) / name
                        try:
                            st = path.stat()
                        except OSError:
                            continue
                        seen[str(path.relative_to(self.directory))] = (st.st_mtime_ns, st.st_size, path)
        known = self.store.kb_files()
        indexed = removed = 0
        for rel in set(self.failed) - set(seen):
            del self.failed[rel]
        for rel, (mtime_ns, size, path) in seen.items():
            if known.get(rel) == (mtime_ns, size):
                continue
            if rel in self.failed and self.failed[rel][0] == (mtime_ns, size):
                continue
            try:
                passages = document_passages(path.read_bytes(), rel, Path(rel).stem, strict=False)
            except (OSError, DocumentError) as exc:
                reason = str(exc) if isinstance(exc, DocumentError) else f"{rel}: cannot read it ({exc.strerror or exc})"
                log.warning("knowledge base %s: not indexed: %s", self.directory, reason)
                self.failed[rel] = ((mtime_ns, size), reason)
                if rel in known:  # what it said before no longer holds
                    self.store.kb_remove_file(rel)
                    removed += 1
                continue
            self.failed.pop(rel, None)
            self.store.kb_replace_file(rel, mtime_ns, size, passages)
            indexed += 1
        for rel in set(known) - set(seen):
            self.store.kb_remove_file(rel)
            removed += 1
        if indexed or removed:
            log.info("knowledge base %s: reindexed %d file(s), removed %d", self.directory, indexed, removed)
        return {"indexed": indexed, "removed": removed}

    def search(self, question: str) -> list[dict]:
        words = [w for w in (m.group(0).lower() for m in WORD.finditer(question)) if w not in STOPWORDS]
        words = list(dict.fromkeys(words))[:32]
        if not words:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        return self.store.kb_search(match, self.max_passages)

    def documents(self) -> list[dict]:
        """The indexed documents: [{"path", "passages", "size", "mtime_ns"}], by path."""
        counts = {row["source"]: row["n"] for row in
                  self.store._query("SELECT source, count(*) AS n FROM kb_passages GROUP BY source")}
        return [{"path": path, "passages": counts.get(path, 0), "size": size, "mtime_ns": mtime_ns}
                for path, (mtime_ns, size) in sorted(self.store.kb_files().items())]

    def _directory_problem(self) -> str | None:
        try:
            st = os.stat(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return f"directory {self.directory} does not exist (deploy creates it; add documents with `clawbot kb add`)"
        except OSError as exc:
            return f"directory {self.directory} cannot be reached by this agent's user ({exc.strerror or exc})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.directory} is not a directory"
        if not os.access(self.directory, os.R_OK | os.X_OK):
            return f"directory {self.directory} is not readable by this agent's user"
        return None

    def problem(self) -> str | None:
        """Why this knowledge base cannot answer now (None: it can). Rescans first, at most every rescan interval."""
        problem = self._directory_problem()
        if problem:
            return problem
        self.refresh()
        if not self.store.kb_files():
            unreadable = f" ({len(self.failed)} file(s) could not be read)" if self.failed else ""
            return f"no documents indexed in {self.directory}{unreadable}: add some with `clawbot kb add`"
        return None

    def answer(self, question: str) -> tuple[Answer | None, str]:
        problem = self._directory_problem()
        if problem:
            return None, f"knowledge base {problem}"
        self.refresh()
        hits = self.search(question)
        if not hits:
            return None, "no passage in the knowledge base matches the question"
        parts = ["The model is unavailable right now. These passages from the local knowledge base match your question:"]
        citations = []
        for number, hit in enumerate(hits, 1):
            quote = "\n".join("> " + line for line in hit["content"].splitlines())
            parts.append(f"{quote}\n— [{number}] {hit['source']} § {hit['heading']}")
            citations.append({"source": hit["source"], "heading": hit["heading"]})
        return Answer("knowledge_base", "\n\n".join(parts), citations), f"{len(hits)} passage(s) found"


# ---------------------------------------------------------------------------------- web search


class WebSearch:
    """A SearxNG-compatible endpoint: GET endpoint?q=...&format=json -> {"results": [{title, url, content}]}."""

    def __init__(self, endpoint: str, timeout_s: float, max_results: int):
        self.endpoint, self.timeout_s, self.max_results = endpoint, timeout_s, max_results

    def problem(self) -> str | None:
        """Why web search cannot answer now (None: it may; the endpoint is not probed)."""
        if not self.endpoint:
            return "no endpoint set (chat.web_search.endpoint is empty)"
        return None

    async def answer(self, question: str) -> tuple[Answer | None, str]:
        if not self.endpoint:
            return None, "skipped: no chat.web_search.endpoint configured"
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=True) as http:
                response = await http.get(self.endpoint, params={"q": question, "format": "json"})
            response.raise_for_status()
            results = response.json().get("results") or []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return None, f"search endpoint failed ({type(exc).__name__}: {exc})"
        results = [r for r in results if isinstance(r, dict) and (r.get("url") or r.get("content"))][: self.max_results]
        if not results:
            return None, "the search returned no results"
        parts = ["The model is unavailable right now. A web search found:"]
        citations = []
        for number, result in enumerate(results, 1):
            title = str(result.get("title") or result.get("url") or "result")
            snippet = str(result.get("content") or "").strip()
            parts.append(f"[{number}] {title}\n{snippet}\n{result.get('url', '')}".rstrip())
            citations.append({"title": title, "url": str(result.get("url") or "")})
        return Answer("web_search", "\n\n".join(parts), citations), f"{len(results)} result(s)"


# ---------------------------------------------------------------------------------- in order


class Fallbacks:
    def __init__(self, strategies: list[str], knowledge_base: KnowledgeBase | None, web_search: WebSearch | None):
        self.strategies, self.knowledge_base, self.web_search = strategies, knowledge_base, web_search

    @classmethod
    def from_config(cls, config: dict, store: Store) -> "Fallbacks":
        chat = config["chat"]
        kb = KnowledgeBase(store, chat["knowledge_base"]["directory"], chat["knowledge_base"]["max_passages"])
        web = WebSearch(chat["web_search"]["endpoint"], chat["web_search"]["timeout_s"], chat["web_search"]["max_results"])
        return cls(list(config["fallback_strategies"]), kb, web)

    def problems(self) -> list[str]:
        """One line per configured strategy that cannot answer now, "<strategy>: <why>", in the configured order.

        Empty when every configured strategy can answer (or none is configured). Cheap enough for a status
        endpoint: the knowledge base rescans its directory at most every rescan interval, web search is not
        probed over the network. Never raises: a failed check is itself reported."""
        found = []
        for strategy in self.strategies:
            try:
                if strategy == "knowledge_base":
                    problem = self.knowledge_base.problem() if self.knowledge_base else "not configured"
                elif strategy == "web_search":
                    problem = self.web_search.problem() if self.web_search else "not configured"
                else:
                    problem = "unknown strategy"
            except Exception as exc:  # a status endpoint reports it rather than failing (e.g. a locked database)
                log.warning("fallback %s: cannot check: %s", strategy, exc)
                problem = f"cannot check ({type(exc).__name__}: {exc})"
            if problem:
                found.append(f"{strategy}: {problem}")
        return found

    async def answer(self, question: str) -> Outcome:
        tried: list[str] = []
        if not self.strategies:
            tried.append("no fallback_strategies configured")
        for strategy in self.strategies:
            if strategy == "knowledge_base":
                answer, reason = self.knowledge_base.answer(question)
            elif strategy == "web_search":
                answer, reason = await self.web_search.answer(question)
            else:  # the schema allows no other value; kept so a future one is skipped, not fatal
                answer, reason = None, "unknown strategy"
            tried.append(f"{strategy}: {reason}")
            log.info("fallback %s: %s", strategy, reason)
            if answer is not None:
                return Outcome(answer, tried)
        return Outcome(None, tried)
