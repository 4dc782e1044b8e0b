"""Answers when the model is unavailable: local knowledge base (SQLite FTS5) and web search (SearxNG JSON).

Tried in the order of `fallback_strategies`. Each strategy returns an `Answer` (text + citations +
source label) or None with a reason; the reasons are logged and kept with the reply so the user sees
why the model did not answer and where the answer came from instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from clawbot.chat.store import Store

log = logging.getLogger("clawbot.chat.fallbacks")

KB_SUFFIXES = (".md", ".markdown", ".txt")
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


def split_passages(text: str, title: str) -> list[tuple[str, str]]:
    """(heading path, passage) pairs: one per paragraph, each under the headings it sits in."""
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
        if line.strip().startswith("```"):
            in_fence = not in_fence
            paragraph.append(line)
            continue
        match = None if in_fence else HEADING.match(line)
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


class KnowledgeBase:
    """Markdown/text files of one directory, indexed into the store's FTS5 table; reindexed on change."""

    def __init__(self, store: Store, directory: str, max_passages: int, rescan_interval_s: float = 2.0):
        self.store, self.directory, self.max_passages = store, Path(directory), max_passages
        self.rescan_interval_s = rescan_interval_s
        self._scanned_at = 0.0

    def refresh(self, force: bool = False) -> dict:
        """Bring the index in line with the directory (new, changed and removed files). Cheap when unchanged."""
        if not force and time.monotonic() - self._scanned_at < self.rescan_interval_s:
            return {"indexed": 0, "removed": 0}
        self._scanned_at = time.monotonic()
        seen: dict[str, tuple[int, int, Path]] = {}
        if self.directory.is_dir():
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
        for rel, (mtime_ns, size, path) in seen.items():
            if known.get(rel) == (mtime_ns, size):
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                log.warning("knowledge base: cannot read %s: %s", path, exc)
                continue
            self.store.kb_replace_file(rel, mtime_ns, size, split_passages(text, Path(rel).stem))
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

    def answer(self, question: str) -> tuple[Answer | None, str]:
        if not self.directory.is_dir():
            return None, f"knowledge base directory {self.directory} does not exist"
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
