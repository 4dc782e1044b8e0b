"""Context upkeep: every prompt fits `context_window - model_gateway.max_tokens`, counted in real tokens.

The article's maintain_context (section 5.3) counts characters and cuts history to the last five turns,
then summarises. Here everything is counted with the model's own tokenizer (the gateway's /v1/tokenize,
which applies the chat template), and nothing is dropped silently:

- the system prompt and the newest turns (`chat.summary.keep_recent_messages`, fewer if they alone are
  too big) are sent verbatim;
- everything older, an earlier summary included, is summarised by the model into one summary message
  (at most `chat.summary.max_tokens`) that is stored, shown to the user as "earlier messages summarised"
  and expandable to the originals, which stay in the database;
- the summary rides in the system message (one system message: some chat templates refuse a second);
- if even the system prompt and the newest message cannot fit, or summarising is off and the
  conversation has outgrown the budget, `ContextTooLong` carries a message for the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from clawbot.common.modelclient import ModelClient
from clawbot.chat.store import Store

log = logging.getLogger("clawbot.chat.context")

SUMMARY_HEADER = "Summary of the earlier conversation (older messages were summarised):\n"
SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for your own later reference. Keep names, numbers, decisions, "
    "questions still open and what the user wants. Write only the summary, in the user's language."
)
SENT_ROLES = {"user": ("complete",), "assistant": ("complete", "incomplete")}


class ContextTooLong(Exception):
    """The conversation cannot be brought within the budget; `str(exc)` is shown to the user."""


@dataclass
class Settings:
    system_prompt: str
    budget: int  # context_window - model_gateway.max_tokens
    context_window: int
    summary_enabled: bool
    keep_recent: int
    summary_max_tokens: int

    @classmethod
    def from_config(cls, config: dict) -> "Settings":
        chat = config["chat"]
        return cls(
            system_prompt=chat["system_prompt"],
            budget=config["context_window"] - config["model_gateway"]["max_tokens"],
            context_window=config["context_window"],
            summary_enabled=chat["summary"]["enabled"],
            keep_recent=chat["summary"]["keep_recent_messages"],
            summary_max_tokens=chat["summary"]["max_tokens"],
        )


@dataclass
class Prompt:
    messages: list[dict]
    tokens: int
    budget: int
    new_summary: dict | None = None
    summary_requests: list[int] = field(default_factory=list)  # prompt tokens of each summary request


def system_message(settings: Settings, summary: str | None) -> dict:
    content = settings.system_prompt
    if summary is not None:
        content = f"{content}\n\n{SUMMARY_HEADER}{summary}" if content else f"{SUMMARY_HEADER}{summary}"
    return {"role": "system", "content": content}


def sendable(message: dict) -> bool:
    return message["status"] in SENT_ROLES.get(message["role"], ()) and bool(message["content"])


def assemble(settings: Settings, summary: str | None, turns: list[dict]) -> list[dict]:
    return [system_message(settings, summary)] + [{"role": m["role"], "content": m["content"]} for m in turns]


class ContextKeeper:
    def __init__(self, store: Store, client: ModelClient, settings: Settings):
        self.store, self.client, self.settings = store, client, settings

    async def build(self, conv_id: str) -> Prompt:
        s = self.settings
        active = self.store.active_messages(conv_id)
        summaries = [m for m in active if m["role"] == "summary"]
        summary = summaries[-1] if summaries else None
        turns = [m for m in active if m["role"] != "summary" and sendable(m)]
        if not turns:
            raise ContextTooLong("there is no message to answer")
        messages = assemble(s, summary["content"] if summary else None, turns)
        tokens = await self.client.count_tokens(messages)
        if tokens <= s.budget:
            return Prompt(messages, tokens, s.budget)

        newest = turns[-1]
        minimal = await self.client.count_tokens(assemble(s, None, [newest]))
        if minimal > s.budget:
            raise ContextTooLong(
                f"Your message is too long for the model: with the system prompt it takes {minimal} tokens, but a "
                f"prompt may use at most {s.budget} (context window {s.context_window} minus room for the reply). "
                "Shorten it or split it into several messages.")
        if not s.summary_enabled:
            raise ContextTooLong(
                f"This conversation has outgrown the model's context ({tokens} tokens, at most {s.budget} fit) and "
                "summarising is turned off (chat.summary.enabled). Start a new conversation.")

        reserve = s.summary_max_tokens + await self._header_overhead()
        keep = min(s.keep_recent, len(turns))
        while keep >= 1:
            recent_tokens = await self.client.count_tokens(assemble(s, None, turns[-keep:]))
            if recent_tokens + reserve <= s.budget:
                break
            keep -= 1
        if keep == 0:
            raise ContextTooLong(
                f"Your message fits the model's context only without the earlier conversation "
                f"({minimal} of {s.budget} tokens, and a summary of the earlier messages needs up to {reserve} more). "
                "Shorten the message or start a new conversation.")
        recent = turns[-keep:]
        recent_ids = {m["id"] for m in recent}
        cover = [m for m in active if m["id"] not in recent_ids and (m["role"] == "summary" or sendable(m))]
        # messages that are never sent (errors, rejected) are covered too, so the summary hides a clean range
        first_recent = min(recent_ids)
        cover_ids = [m["id"] for m in active if m["id"] not in recent_ids and _position(m) < first_recent]
        if not cover:
            raise ContextTooLong(f"the newest messages alone take more than {s.budget} tokens")

        summary_text, summary_prompts = await self.summarise(conv_id, cover)
        messages = assemble(s, summary_text, recent)
        tokens = await self.client.count_tokens(messages)
        if tokens > s.budget:  # the re-tokenised summary came out longer than generated: shorten, visibly
            summary_text, tokens = await self._shorten(summary_text, recent)
            messages = assemble(s, summary_text, recent)
        stored = self.store.add_summary(conv_id, summary_text, cover_ids,
                                        meta={"covered_messages": len(cover_ids), "prompt_tokens_after": tokens})
        log.info("conversation %s: summarised %d messages; prompt now %d of %d tokens",
                 conv_id, len(cover_ids), tokens, s.budget)
        return Prompt(messages, tokens, s.budget, new_summary=stored, summary_requests=summary_prompts)

    async def _header_overhead(self) -> int:
        with_header = await self.client.count_tokens([system_message(self.settings, "")])
        without = await self.client.count_tokens([system_message(self.settings, None)])
        return max(0, with_header - without) + 8

    async def _shorten(self, text: str, recent: list[dict]) -> tuple[str, int]:
        marker = " … [summary shortened to fit]"
        low, high = 0, len(text)
        best = None
        while low <= high:
            mid = (low + high) // 2
            candidate = text[:mid] + marker
            n = await self.client.count_tokens(assemble(self.settings, candidate, recent))
            if n <= self.settings.budget:
                best, low = (candidate, n), mid + 1
            else:
                high = mid - 1
        if best is None:
            raise ContextTooLong("the newest messages leave no room for a summary of the earlier conversation")
        return best

    # ------------------------------------------------------------------ summarising

    async def summarise(self, conv_id: str, items: list[dict]) -> tuple[str, list[int]]:
        """One summary of `items`; when they don't fit one summary request, a rolling summary over chunks."""
        s = self.settings
        limit = s.context_window - s.summary_max_tokens
        lines = [_transcript_line(m) for m in items]
        prompts: list[int] = []
        running: str | None = None
        pending: list[str] = []
        index = 0
        while index < len(lines) or pending:
            # grow the chunk line by line while the summary request still fits
            while index < len(lines):
                trial = pending + [lines[index]]
                if await self._summary_request_tokens(running, trial) <= limit:
                    pending, index = trial, index + 1
                    continue
                if not pending:  # one line alone is too big: split it, keep both halves in order
                    if len(lines[index]) < 64:
                        raise ContextTooLong("the earlier conversation cannot be summarised within the context window")
                    head, tail = _split(lines[index])
                    lines[index:index + 1] = [head, tail]
                    continue
                break
            if not pending:
                break
            request = self._summary_request(running, pending)
            tokens = await self.client.count_tokens(request)
            request_id = self.store.record_request(conv_id, "summary", tokens, limit)
            prompts.append(tokens)
            text, usage = await self.client.complete(request, s.summary_max_tokens, 0.2)
            self.store.finish_request(request_id, "complete",
                                      (usage or {}).get("prompt_tokens") if isinstance(usage, dict) else None)
            running = text.strip() or "(the model returned an empty summary)"
            pending = []
        return running or "(nothing to summarise)", prompts

    def _summary_request(self, running: str | None, lines: list[str]) -> list[dict]:
        body = "\n\n".join(lines)
        if running:
            body = f"Summary so far:\n{running}\n\nConversation continued:\n{body}"
        return [{"role": "system", "content": SUMMARY_INSTRUCTION}, {"role": "user", "content": body}]

    async def _summary_request_tokens(self, running: str | None, lines: list[str]) -> int:
        return await self.client.count_tokens(self._summary_request(running, lines))


def _position(message: dict) -> int:
    """Where a message sits in the conversation: a summary stands where its first covered message was."""
    return message["covers_from"] if message["role"] == "summary" else message["id"]


def _transcript_line(message: dict) -> str:
    if message["role"] == "summary":
        return f"Summary of what came before: {message['content']}"
    speaker = "User" if message["role"] == "user" else "Assistant"
    return f"{speaker}: {message['content']}"


def _split(line: str) -> tuple[str, str]:
    cut = len(line) // 2
    space = line.rfind(" ", 0, cut)
    if space > cut // 2:
        cut = space
    return line[:cut], line[cut:]
