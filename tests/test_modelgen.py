"""clawbot.tools.modelgen: the random-weight GGUFs load and generate in real llama.cpp and have exact sizes."""

from __future__ import annotations

import math
import time

import gguf
import numpy as np
import pytest

from clawbot import cli
from clawbot.tools import modelgen
from fixtures_models import gguf_100m, models_dir, tiny_gguf, tiny_gguf_q4, write_model_file  # noqa: F401


def test_tiny_model_loads_and_generates_in_llama_cpp(tiny_gguf):
    import llama_cpp  # the llama extra; CI installs it: a missing install must fail, not skip
    # logits_all: without it llama-cpp-python leaves `scores` unwritten (sampling happens in the sampler)
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, n_threads=2, verbose=False, seed=1,
                          logits_all=True)
    prompt = llm.tokenize(b"hello world")
    assert prompt[0] == 1  # <s> added (add_bos_token)
    llm.eval(prompt)
    last = llm.scores[llm.n_tokens - 1]
    assert np.isfinite(last).all() and np.abs(last).max() > 0
    # ban the end-of-text tokens so the count of generated tokens is exact
    out = llm.create_completion("hello", max_tokens=12, temperature=0.0,
                                logit_bias={2: -1e9, llm.tokenize(b"<|im_end|>", special=True)[-1]: -1e9})
    assert out["usage"]["completion_tokens"] == 12
    assert isinstance(out["choices"][0]["text"], str)


def test_chat_template_gives_chat_completions(tiny_gguf):
    import llama_cpp  # the llama extra; CI installs it: a missing install must fail, not skip
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, n_threads=2, verbose=False, seed=1)
    assert llm.metadata["tokenizer.chat_template"] == modelgen.CHATML_TEMPLATE
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["prompt_tokens"] > 3  # the template's markers were added around "hi"


@pytest.mark.parametrize("quant, block_bytes", [("Q8_0", 34), ("Q4_0", 18)])
def test_quantized_tensor_bytes_follow_block_math(models_dir, quant, block_bytes):
    path = write_model_file(models_dir, "tiny", quant)
    shape = modelgen.PRESETS["tiny"]
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 2 + 9 * shape.n_layer + 1
    for tensor in reader.tensors:
        row_length, n_rows = int(tensor.shape[0]), int(math.prod(tensor.shape[1:]))
        if tensor.name.endswith("norm.weight"):
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert tensor.n_bytes == row_length * 4
        else:
            assert tensor.tensor_type.name == quant
            assert tensor.n_bytes == n_rows * (row_length // 32) * block_bytes
    q = by_name["blk.0.attn_q.weight"]
    assert [int(d) for d in q.shape] == [shape.n_embd, shape.n_head * shape.head_dim_resolved]
    k = by_name["blk.0.attn_k.weight"]
    assert [int(d) for d in k.shape] == [shape.n_embd, shape.n_head_kv * shape.head_dim_resolved]
    down = by_name["blk.1.ffn_down.weight"]
    assert [int(d) for d in down.shape] == [shape.n_ff, shape.n_embd]
    assert down.n_bytes == shape.n_embd * (shape.n_ff // 32) * block_bytes
    # the data section ends where the last (aligned) tensor ends
    last = max(reader.tensors, key=lambda t: t.data_offset)
    assert path.stat().st_size == last.data_offset + last.n_bytes + (-last.n_bytes % 32)


def test_quantized_blocks_hold_finite_fp16_scales(tiny_gguf_q4):
    reader = gguf.GGUFReader(tiny_gguf_q4)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    blocks = np.asarray(tensor.data).reshape(-1, 18)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)
    assert np.isfinite(scales).all() and (scales > 0).all()
    values = gguf.quants.dequantize(np.asarray(tensor.data), gguf.GGMLQuantizationType.Q4_0)
    assert np.isfinite(values).all()
    assert 0.005 < float(values.std()) < 0.05  # ~ the 0.02 init scale


def test_file_is_valid_gguf_with_llama_metadata_and_tokenizer(tiny_gguf):
    shape = modelgen.PRESETS["tiny"]
    reader = gguf.GGUFReader(tiny_gguf)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == shape.n_layer
    assert field("llama.embedding_length") == shape.n_embd
    assert field("llama.attention.head_count") == shape.n_head
    assert field("llama.attention.head_count_kv") == shape.n_head_kv
    assert field("llama.feed_forward_length") == shape.n_ff
    assert field("llama.context_length") == shape.n_ctx_train
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == shape.n_vocab == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3:3 + 256] == [f"<0x{b:02X}>" for b in range(256)]
    assert field("tokenizer.ggml.model") == "llama"
    assert "<|im_start|>" in field("tokenizer.chat_template")


def test_llama_3_8b_preset_has_the_real_shapes_and_parameter_count():
    shape = modelgen.PRESETS["llama-3-8b"]
    assert (shape.n_embd, shape.n_layer, shape.n_head, shape.n_head_kv, shape.n_ff, shape.n_vocab) == \
        (4096, 32, 32, 8, 14336, 128256)
    assert shape.rope_theta == 500000.0
    assert shape.n_params == 8_030_261_248  # Meta-Llama-3-8B's published parameter count
    plan = {t.name: t for t in modelgen.tensor_plan(shape, "Q8_0")}
    assert plan["blk.31.attn_k.weight"].ne == (4096, 1024)
    q8_bytes = sum(t.n_bytes for t in plan.values())
    assert q8_bytes == sum(
        t.n_bytes if t.ggml_type == gguf.GGMLQuantizationType.F32 else math.prod(t.ne) // 32 * 34
        for t in plan.values())
    assert 8.0e9 < q8_bytes < 8.6e9  # llama-3-8b Q8_0 files are ~8.5 GB
    assert modelgen.PRESETS["llama-3.2-1b"].n_params == 1_235_814_400


def test_rows_a_block_does_not_divide_fall_back_to_f16():
    shape = modelgen.ModelShape(n_layer=1, n_embd=96, n_head=3, n_head_kv=1, n_ff=200, n_vocab=300)
    plan = {t.name: t for t in modelgen.tensor_plan(shape, "Q4_0")}
    assert plan["blk.0.ffn_up.weight"].ggml_type == gguf.GGMLQuantizationType.Q4_0  # row = n_embd = 96
    assert plan["blk.0.ffn_down.weight"].ggml_type == gguf.GGMLQuantizationType.F16  # row = n_ff = 200


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        modelgen.ModelShape(n_layer=1, n_embd=64, n_head=4, n_head_kv=3, n_ff=64, n_vocab=512)
    with pytest.raises(ValueError, match="n_vocab"):
        modelgen.ModelShape(n_layer=1, n_embd=64, n_head=4, n_head_kv=4, n_ff=64, n_vocab=100)


def test_writing_is_fast(models_dir):
    started = time.perf_counter()
    written = modelgen.write_model(models_dir / "speed.gguf", modelgen.PRESETS["test-100m"], "Q8_0")
    elapsed = time.perf_counter() - started
    assert written.file_bytes > 100e6
    # the brief: ~1 GB in well under a minute; 120 MB must take well under 6 s even on a slow CI disk
    assert written.file_bytes / elapsed > 40e6, f"{written.file_bytes / elapsed / 1e6:.0f} MB/s"
    written.path.unlink()


def test_cli_writes_a_custom_shape(tmp_path, capsys):
    out = tmp_path / "custom.gguf"
    rc = cli.main(["make-model", str(out), "--layers", "3", "--embd", "128", "--heads", "4", "--kv-heads", "1",
                   "--ff", "320", "--vocab", "600", "--ctx", "1024", "--quant", "Q4_0"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 3
    assert reader.fields["llama.attention.head_count_kv"].contents() == 1
    assert reader.fields["llama.context_length"].contents() == 1024
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 600
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_0", "F32"}


def test_cli_preset(tmp_path):
    out = tmp_path / "preset.gguf"
    assert cli.main(["make-model", str(out), "--preset", "tiny", "--quant", "F16"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.name"].contents() == "tiny"
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
