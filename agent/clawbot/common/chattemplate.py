"""What a GGUF says about chatting with it, and rendering a chat with its own Jinja template.

- `stop_sequences`: the stop strings that end a reply (the template's turn markers, the model's end tokens as
  text); the gateway adds them to every chat completion, so a reply ends by itself and no marker reaches a client.
- `model_card`: what the model is (names, tags, chat template present), and whether it is a base model.
- `render`: the template the way llama_cpp.server does it. Only needed for `/v1/tokenize` with `messages` on the
  llama-cpp-python engine: llama-server renders templates itself (POST /apply-template), llama_cpp.server has no
  such endpoint. Mirrors llama_cpp.llama_chat_format.Jinja2ChatFormatter (sandboxed environment, trim_blocks,
  lstrip_blocks, bos/eos token strings, raise_exception), whose output llama_cpp tokenizes without adding a BOS.
"""

from __future__ import annotations

import datetime as dt
import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass

from clawbot.common.sizing import read_gguf_header


class TemplateError(ValueError):
    """The model has no template, or the template refused these messages."""


@functools.lru_cache(maxsize=4)
def gguf_template_info(path: str, mtime_ns: int) -> tuple[str | None, int | None, int | None]:
    """(template, bos id, eos id) from the GGUF header; cached per file version."""
    meta = read_gguf_header(path).metadata
    template = meta.get("tokenizer.chat_template")
    return (template if isinstance(template, str) else None, meta.get("tokenizer.ggml.bos_token_id"),
            meta.get("tokenizer.ggml.eos_token_id"))


def render(template: str, messages: list[dict], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt,
            raise_exception=raise_exception, strftime_now=lambda f: dt.datetime.now().strftime(f),
            functions=None, function_call=None, tools=None, tool_choice=None)
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template failed: {exc}") from None


# --------------------------------------------------------------------------- when a reply is over
#
# A reply is over when the model writes its template's end-of-turn marker, starts the next turn, or writes its
# end-of-sequence token. llama.cpp stops by itself on the end-of-generation *tokens* and never renders control
# tokens as text (llama-server without --special), but a model may also spell a marker out of ordinary tokens
# ("<", "end", "_of", "_turn", ">"), and a transcript template's turn starts ("USER:") are plain text: those
# only a stop string catches. A base model never learned a chat template's special markers at all (measured on
# the demo's Gemma 3 270M base model through the gateway with `gemma` and these stops: 0 of 6 replies ended before
# 512 tokens, each repeating the prompt), while it does continue a plain USER:/ASSISTANT: transcript and writes
# the next `USER:` itself (`vicuna`: 28 of 30 ended, median 16 tokens).

# llama.cpp's built-in templates (src/llama-chat.cpp, the names `model_server.chat_template` takes): the text
# that ends an assistant turn and the text that opens the next one.
TURN_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "phi4": ("<|im_end|>", "<|im_start|>"),
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "llama3": ("<|eot_id|>", "<|start_header_id|>"),
    "llama2": ("</s>", "[INST]"),
    "llama2-sys": ("</s>", "[INST]"),
    "llama2-sys-bos": ("</s>", "[INST]"),
    "llama2-sys-strip": ("</s>", "[INST]"),
    "mistral-v1": ("</s>", "[INST]"),
    "mistral-v3": ("</s>", "[INST]"),
    "mistral-v3-tekken": ("</s>", "[INST]"),
    "mistral-v7": ("</s>", "[INST]"),
    "mistral-v7-tekken": ("</s>", "[INST]"),
    "phi3": ("<|end|>", "<|user|>"),
    "zephyr": ("<|endoftext|>", "<|user|>"),
    "monarch": ("</s>",),
    "openchat": ("<|end_of_turn|>", "GPT4 Correct User:"),
    "vicuna": ("</s>", "USER:", "ASSISTANT:"),
    "vicuna-orca": ("</s>", "USER:", "ASSISTANT:", "SYSTEM:"),
    "command-r": ("<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"),
    "deepseek3": ("<｜end▁of▁sentence｜>", "<｜User｜>"),
    "granite": ("<|end_of_text|>", "<|start_of_role|>"),
}
# In template text (Jinja, the GGUF's own or model_server.chat_template's), the markers that are unmistakably
# markers: every special-looking one of the table above (plain words such as `USER:` may be anything in Jinja).
TEXT_MARKERS: tuple[str, ...] = tuple(dict.fromkeys(
    m for markers in TURN_MARKERS.values() for m in markers if m[0] in "<["))
# The model's own end tokens, written as text (only control tokens: a word is never a stop)
END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_CONTROL = 3  # llama.cpp's token type for control tokens (gguf.TokenType.CONTROL)


@dataclass(frozen=True)
class ModelFacts:
    """What the GGUF says about chatting with it: its metadata (long arrays only counted), its own chat template
    and the text of its end tokens (id -> (text, token type))."""

    metadata: dict
    template: str | None
    special_tokens: dict[int, tuple[str, int]]

    def token_text(self, key: str) -> str | None:
        """The text of the control token the metadata key (e.g. tokenizer.ggml.eos_token_id) names, if any."""
        token_id = self.metadata.get(key)
        if not isinstance(token_id, int) or token_id not in self.special_tokens:
            return None
        text, kind = self.special_tokens[token_id]
        return text if kind == _CONTROL and text else None


def read_model_facts(path: str) -> ModelFacts:
    """The GGUF's metadata and the texts of its end tokens (END_TOKEN_KEYS), without reading the weights; cached
    per file version."""
    st = os.stat(path)
    return _model_facts(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _model_facts(path: str, mtime_ns: int, size: int) -> ModelFacts:
    header = read_gguf_header(path)
    meta = header.metadata
    wanted = {meta[key] for key in END_TOKEN_KEYS if isinstance(meta.get(key), int)}
    template = meta.get("tokenizer.chat_template")
    return ModelFacts(meta, template if isinstance(template, str) else None, _token_texts(path, wanted))


def _token_texts(path: str, wanted: set[int]) -> dict[int, tuple[str, int]]:
    """{id: (text, type)} for the wanted token ids: one walk over the GGUF's key-value section to the token list
    and the token types (sizing.read_gguf_header only counts those arrays)."""
    if not wanted:
        return {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 24  # magic, version, tensor count, key-value count
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        texts: dict[int, str] = {}
        types: dict[int, int] = {}

        def skip(value_type: int) -> None:
            nonlocal pos
            if value_type in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[value_type]
            elif value_type == 8:
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            elif value_type == 9:
                item_type, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item_type in _SCALAR_SIZES:
                    pos += count * _SCALAR_SIZES[item_type]
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {value_type} at byte {pos}")

        for _ in range(n_kv):
            length = struct.unpack_from("<Q", buf, pos)[0]
            key = bytes(buf[pos + 8:pos + 8 + length]).decode("utf-8", errors="replace")
            pos += 8 + length
            value_type = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
            if value_type == 9 and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                item_type, count = struct.unpack_from("<IQ", buf, pos)
                start = pos + 12
                if key == "tokenizer.ggml.token_type" and item_type == 5:  # int32: read the wanted ones directly
                    types = {i: struct.unpack_from("<i", buf, start + 4 * i)[0] for i in wanted if i < count}
                elif key == "tokenizer.ggml.tokens" and item_type == 8:
                    at, last = start, max(wanted)
                    for i in range(min(count, last + 1)):
                        length = struct.unpack_from("<Q", buf, at)[0]
                        if i in wanted:
                            texts[i] = bytes(buf[at + 8:at + 8 + length]).decode("utf-8", errors="replace")
                        at += 8 + length
            skip(value_type)
        return {i: (texts[i], types.get(i, 0)) for i in texts}


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def stop_sequences(chat_template: str, facts: ModelFacts | None, extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The stop strings that end a chat reply: the turn markers of the template in use (model_server.chat_template
    by name or as text, else the GGUF's own), the model's end tokens as text, then `extra`
    (model_server.stop_sequences). In that order, without repeats."""
    stops: list[str] = []
    if chat_template and "{" not in chat_template:
        stops += TURN_MARKERS.get(chat_template, ())
    else:
        text = chat_template or (facts.template if facts else None) or ""
        stops += [m for m in TEXT_MARKERS if m in text]
    if facts is not None:
        stops += end_token_texts(facts)
    stops += [s for s in extra if s]
    return tuple(dict.fromkeys(stops))


def end_token_texts(facts: ModelFacts) -> tuple[str, ...]:
    """The model's end-of-sequence / end-of-turn / end-of-message control tokens, as text."""
    return tuple(dict.fromkeys(t for key in END_TOKEN_KEYS if (t := facts.token_text(key))))


def merge_stops(requested: str | list[str] | None, derived: tuple[str, ...]) -> list[str]:
    """A request's own stop strings first (OpenAI's `stop`: a string or a list), then the derived ones."""
    own = [requested] if isinstance(requested, str) else list(requested or [])
    return list(dict.fromkeys(s for s in [*own, *derived] if s))


# --------------------------------------------------------------------------- the model card

# Words in general.finetune / general.name / general.basename / general.tags that mark a model tuned to follow
# instructions (as Hugging Face names them: gemma-3-270m-it, Qwen2.5-0.5B-Instruct, ...-chat, ...-sft).
INSTRUCT_WORDS = frozenset({"it", "instruct", "instruction", "chat", "sft", "rlhf", "dpo", "assistant"})


def model_card(facts: ModelFacts) -> dict:
    """A small card from the GGUF's metadata for /status and the chat node's model chip: what the model is, and
    whether it is a base model (no instruct/chat word in its names and tags, no chat template in the GGUF), which
    continues text instead of following instructions."""
    meta = facts.metadata

    def text(key: str) -> str:
        value = meta.get(key)
        return value if isinstance(value, str) else ""

    tags = [t for t in meta.get("general.tags") or [] if isinstance(t, str)] \
        if isinstance(meta.get("general.tags"), list) else []
    words = set()
    for source in (text("general.finetune"), text("general.name"), text("general.basename"), *tags):
        words.update(w for w in re.split(r"[^a-z0-9]+", source.lower()) if w)
    instruct_words = sorted(words & INSTRUCT_WORDS)
    has_template = facts.template is not None
    base = not instruct_words and not has_template
    name = text("general.name") or text("general.basename") or text("general.architecture") or "unknown"
    size = text("general.size_label")
    card = {
        "name": name,
        "architecture": text("general.architecture"),
        "size_label": size,
        "type": text("general.type"),
        "finetune": text("general.finetune"),
        "tags": tags,
        "chat_template_in_gguf": has_template,
        "instruct": bool(instruct_words),
        "base_model": base,
    }
    if base:
        card["note"] = (f"{name} is a {size + ' ' if size else ''}base model (no instruct or chat tag in its "
                        "metadata, no chat template in the GGUF): it continues text rather than following "
                        "instructions, so its answers are short and often beside the point. It proves the path; "
                        "for real answers set clawbot_model_file to an instruct GGUF (and model_server.chat_template "
                        "to \"\" to use that model's own template)")
    elif not instruct_words:
        card["note"] = "no instruct or chat tag in the metadata, but the GGUF carries a chat template"
    return card
