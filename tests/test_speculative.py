"""model_server.speculative: the schema's values, the run plan's decision with its reason, the llama-server flags it
becomes (checked against the pinned llama.cpp's own argument table), and the acceptance rate `clawbot bench` reads
from llama-server's timings; plus `clawbot bench`'s joules per token from a sampler."""

from __future__ import annotations

import jsonschema
import pytest

from clawbot.common import preflight
from clawbot.common.config import defaults, load_schema
from clawbot.model.engines import Paths, build, llama_server
from clawbot.model.runplan import AUTO_SPECULATIVE, HostFacts, RunPlan
from clawbot.tools import bench

CPU = HostFacts(gpus=(), host_free_bytes=None, usable_cores=16, memlock_limit=preflight.UNLIMITED)
GPU = HostFacts(gpus=(preflight.GpuFacts("NVIDIA H200", 140 << 30, 0),), host_free_bytes=None, usable_cores=16,
                memlock_limit=preflight.UNLIMITED)


def _config(speculative: str, **server) -> dict:
    config = defaults()
    config["model_server"].update(speculative=speculative, model_path="/m/model.gguf", **server)
    return config


def _plan(config: dict, facts: HostFacts = CPU) -> RunPlan:
    return RunPlan.resolve(config, facts, None)


def _command(config: dict, facts: HostFacts = CPU) -> list[str]:
    return llama_server.command(_plan(config, facts), config, Paths(model="/m/model.gguf", binary="/e/llama-server"))


@pytest.mark.parametrize("value", ["off", "auto", "ngram", "/var/lib/clawbot/models/draft.gguf"])
def test_the_schema_takes_off_auto_ngram_and_a_path(value):
    schema = load_schema()["properties"]["model_server"]["properties"]["speculative"]
    jsonschema.validate(value, schema)
    assert defaults()["model_server"]["speculative"] == "off"


@pytest.mark.parametrize("value", ["on", "ngram-mod", "draft.gguf", ""])
def test_the_schema_refuses_anything_else(value):
    schema = load_schema()["properties"]["model_server"]["properties"]["speculative"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, schema)


def test_off_passes_no_speculative_flag():
    cmd = _command(_config("off"))
    assert not [word for word in cmd if word.startswith("--spec") or word in ("-md", "-ngld")]
    assert _plan(_config("off")).speculative.value == "off"


def test_ngram_is_ngram_mod_with_its_lengths():
    plan = _plan(_config("ngram"))
    assert plan.speculative.value == "ngram" and "n-gram" in plan.speculative.reason
    cmd = _command(_config("ngram"))
    i = cmd.index("--spec-type")
    assert tuple(cmd[i:i + len(llama_server.NGRAM_ARGS)]) == llama_server.NGRAM_ARGS


@pytest.mark.parametrize("facts, ngld", [(CPU, "0"), (GPU, "all")], ids=["cpu", "gpu"])
def test_a_draft_model_is_offloaded_like_the_main_model(facts, ngld):
    path = "/var/lib/clawbot/models/draft.gguf"
    config = _config(path, accelerator="auto")
    plan = _plan(config, facts)
    assert plan.speculative.value == path and path in plan.speculative.reason
    cmd = _command(config, facts)
    assert cmd[cmd.index("-md") + 1] == path
    assert cmd[cmd.index("--spec-type") + 1] == "draft-simple"
    assert cmd[cmd.index("-ngld") + 1] == ngld
    assert cmd[cmd.index("--spec-draft-n-max") + 1] == str(llama_server.DRAFT_MAX)


@pytest.mark.parametrize("facts, accelerator", [(CPU, "cpu"), (GPU, "cuda")], ids=["cpu", "gpu"])
def test_auto_is_only_what_a_measurement_supports(facts, accelerator):
    plan = _plan(_config("auto", accelerator="auto"), facts)
    value, why = AUTO_SPECULATIVE[accelerator]
    assert (plan.speculative.value, plan.speculative.reason) == (value, why)
    assert "benchmarks/results/gpu-h200-speculative.md" in why  # the measurement it rests on
    vulkan = _plan(_config("auto", accelerator="vulkan"), facts)
    assert vulkan.speculative.value == "off" and "not measured on vulkan" in vulkan.speculative.reason


def test_llama_cpp_python_and_a_split_say_why_off():
    plan = _plan(_config("ngram", engine="llama-cpp-python"))
    assert plan.speculative.value == "off" and "llama-server engine only" in plan.speculative.reason
    split = _config("/m/draft.gguf")
    split["model_server"]["split"] = {"workers": [{"name": "w1", "port": 50060}]}
    plan = _plan(split)
    assert plan.speculative.value == "off" and "split" in plan.speculative.reason
    assert _plan(dict(split, model_server={**split["model_server"], "speculative": "ngram"})).speculative.value == "ngram"


def test_every_speculative_flag_exists_in_the_pinned_llama_cpp():
    """The flags clawbot passes are in the vendored llama.cpp's common/arg.cpp (not the removed --draft-max)."""
    source = build.cache_root() / "src" / f"llama-cpp-python-{build.LLAMA_CPP_PYTHON_VERSION}" / "common" / "arg.cpp"
    if not source.exists():
        pytest.skip(f"{source} not extracted (clawbot build-engine extracts it)")
    text = source.read_text()
    flags = [w for w in (*llama_server.NGRAM_ARGS, "--spec-type", "-md", "-ngld", "--spec-draft-n-max")
             if w.startswith("-")]
    for flag in flags:
        assert f'"{flag}"' in text, flag
    for value in ("ngram-mod", "draft-simple"):
        assert f'"{value}"' in (source.parent / "speculative.cpp").read_text(), value


def test_bench_reads_the_acceptance_rate_from_llama_servers_timings():
    results = [bench.RequestResult(ok=True, ttft_s=0.05, e2e_s=0.05 + 0.003 * 127, output_tokens=128,
                                   timings={"predicted_per_second": 330.0, "draft_n": 100, "draft_n_accepted": 80}),
               bench.RequestResult(ok=True, ttft_s=0.06, e2e_s=0.06 + 0.004 * 127, output_tokens=128,
                                   timings={"predicted_per_second": 250.0, "draft_n": 60, "draft_n_accepted": 20})]
    level = bench.summarize(results, 1, 1.0)
    assert level["speculative"] == {"requests_with_drafts": 2, "draft_n": 160, "draft_n_accepted": 100,
                                    "acceptance_rate": 0.625}
    # decode apart from the first token: TPOT p50 3.5 ms (the two requests' 3 and 4), decode rate 1 / TPOT
    assert level["tpot_ms"]["p50"] == 3.5 and level["decode_tok_s_per_stream"] == pytest.approx(285.71, abs=0.01)
    assert level["server_decode_tok_s_p50"] == 290.0
    assert bench.summarize(results[:1] + [bench.RequestResult(ok=True, output_tokens=1, ttft_s=0.1, e2e_s=0.1)],
                           1, 1.0)["speculative"]["requests_with_drafts"] == 1


def test_bench_joules_per_token_and_request_from_a_sampler():
    class FakeSampler:
        interval_s = 0.001
        idle_power_w = 100.0

        def window(self, t0, t1):
            return {"available": True, "energy_j": 300.0 * (t1 - t0), "samples": 20, "interval_s": 0.1,
                    "window_s": t1 - t0, "mean_power_w": 300.0, "method": "energy counters"}

        def counter_update_s(self):
            return 0.1

    results = [bench.RequestResult(ok=True, ttft_s=0.05, e2e_s=1.0, output_tokens=100, sent_at=0.0, first_at=0.05,
                                   end_at=1.0),
               bench.RequestResult(ok=True, ttft_s=0.05, e2e_s=1.0, output_tokens=100, sent_at=1.0, first_at=1.05,
                                   end_at=2.0)]
    level = bench.summarize(results, 1, 2.0)
    energy = bench.energy_of_level(FakeSampler(), level, results, 0.0, 2.0)
    assert energy["energy_j"] == 600.0
    assert energy["joules_per_output_token"] == 3.0 and energy["joules_per_request"] == 300.0
    assert energy["joules_per_output_token_above_idle"] == 2.0  # 600 J - 100 W x 2 s over 200 tokens
    # a 50 ms first token against a counter that moves every 100 ms: no split, and it says why
    assert energy["prefill_decode"]["resolved"] is False and "100 ms" in energy["prefill_decode"]["why"]
    assert "not available" in bench.format_table({"url": "u", "prompt_tokens": 1, "max_tokens": 1, "levels": [],
                                                   "energy_source": "not available"})
