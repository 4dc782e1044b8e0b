"""Render a chat with the GGUF's own Jinja chat template, the way llama_cpp.server does it.

Only needed for `/v1/tokenize` with `messages` on the llama-cpp-python engine: llama-server renders
templates itself (POST /apply-template), llama_cpp.server has no such endpoint. Mirrors
llama_cpp.llama_chat_format.Jinja2ChatFormatter (sandboxed environment, trim_blocks, lstrip_blocks,
bos/eos token strings, raise_exception), whose output llama_cpp tokenizes without adding a BOS.
"""

from __future__ import annotations

import datetime as dt
import functools

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
