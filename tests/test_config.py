"""Configuration: --backend, the TOML file, InfiniLM static-services JSON, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, Mock, Router, chat_body

from lmproxy.cli import load_config
from lmproxy.config import ConfigError, load_static_services, parse_backend


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


# --- --backend ------------------------------------------------------------------


def test_backend_plain_url():
    spec = parse_backend("http://10.0.0.5:8100")
    assert (spec.name, spec.host, spec.port, spec.weight, spec.models) == (
        "10.0.0.5:8100",
        "10.0.0.5",
        8100,
        1,
        [],
    )


def test_backend_with_name_weight_models_and_health():
    spec = parse_backend(
        "service_9g8b_8100=http://10.0.0.5:8100,weight=3,model=a,model=b,health=/healthz"
    )
    assert spec.name == "service_9g8b_8100"
    assert spec.url == "http://10.0.0.5:8100"
    assert spec.weight == 3
    assert spec.models == ["a", "b"]
    assert spec.health_path == "/healthz"


def test_backend_https_with_its_tls_options():
    spec = parse_backend("v=https://10.0.0.5,ca=/c.pem,cert=/k.pem,key=/k.key,verify=false")
    assert (spec.name, spec.port, spec.tls) == ("v", 443, True)
    assert (spec.ca, spec.cert, spec.key, spec.verify) == ("/c.pem", "/k.pem", "/k.key", False)
    plain = parse_backend("http://10.0.0.5")
    assert (plain.port, plain.tls, plain.verify) == (80, False, None)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("ftp://x:1", "http:// or https://"),
        ("x:1", "http://"),
        ("https://x:1,verify=maybe", "verify must be true or false"),
        ("http://x:1,ca=/ca.pem", "apply to https:// URLs"),
        ("http://x:1,weight=two", "weight must be an integer"),
        ("http://x:1,colour=red", "unknown option"),
        ("http://x:1,health=nope", "must start with '/'"),
        ("http://x:99999", "Port out of range"),
    ],
)
def test_backend_errors_say_what_to_change(text, names):
    with pytest.raises(ConfigError, match=names):
        parse_backend(text)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="unique"):
        load_config(["--backend", "a=http://x:1", "--backend", "a=http://y:2"])


# --- the TOML file ------------------------------------------------------------------


def test_every_setting_comes_from_the_toml_file(tmp_path):
    path = tmp_path / "lmproxy.toml"
    path.write_text(
        """
host = "127.0.0.2"
port = 9100
health_interval = 7
health-timeout = 2
max_errors = 4
connect_timeout = 1.5
request_timeout = 60
retries = 1
max_body_size = 1048576
default_model = "m"
strategy = "round-robin"
pool_max_idle = 8
pool_idle_timeout = 9
keepalive_timeout = 11
header_timeout = 12
require_model = true
body_timeout = 14
send_timeout = 15
shutdown_timeout = 13
api_keys = ["k1"]
log_level = "debug"

[[services]]
name = "a"
url = "http://10.0.0.5:8100"
weight = 2
models = ["m"]
health_path = "/healthz"
"""
    )
    config = load_config(["--config", str(path)])
    assert config.host == "127.0.0.2" and config.port == 9100
    assert (config.health_interval, config.health_timeout, config.max_errors) == (7, 2, 4)
    assert (config.connect_timeout, config.request_timeout, config.retries) == (1.5, 60, 1)
    assert config.max_body_size == 1048576 and config.default_model == "m"
    assert (config.pool_max_idle, config.pool_idle_timeout) == (8, 9)
    assert (config.keepalive_timeout, config.header_timeout, config.shutdown_timeout) == (
        11,
        12,
        13,
    )
    assert (config.body_timeout, config.send_timeout) == (14, 15)
    assert config.require_model is True
    assert config.api_keys == ["k1"] and config.log_level == "debug"
    (service,) = config.services
    assert (service.name, service.weight, service.models, service.health_path) == (
        "a",
        2,
        ["m"],
        "/healthz",
    )
    # The command line wins over the file, and adds to its services.
    config = load_config(["--config", str(path), "--port", "9200", "--backend", "http://y:1"])
    assert config.port == 9200 and [s.name for s in config.services] == ["a", "y:1"]


def test_toml_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('health_interval = "soon"\n')
    with pytest.raises(ConfigError, match="health_interval"):
        load_config(["--config", str(path)])
    path.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(["--config", str(path)])
    path.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(path)])


def test_worker_timeout_is_off_or_long_enough_for_heartbeats():
    assert load_config(["--workers", "2"]).worker_timeout == 10
    assert load_config(["--workers", "2", "--worker-timeout", "0"]).worker_timeout == 0
    with pytest.raises(ConfigError, match=r"--worker-timeout must be 0 \(off\) or at least 1"):
        load_config(["--workers", "2", "--worker-timeout", "0.5"])
    with pytest.raises(ConfigError, match="--worker-timeout must be >= 0"):
        load_config(["--workers", "2", "--worker-timeout", "-1"])


def test_config_file_served_end_to_end(spawn, tmp_path):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    path = tmp_path / "lmproxy.toml"
    path.write_text(f'[[services]]\nname = "from-file"\nurl = "{backend.url}"\n')
    router = spawn(Router, "--config", str(path))
    router.wait_healthy(1)
    assert router.post("/v1/chat/completions", chat_body()).status == 200
    assert router.stats_of("from-file")["request_count"] == 1


# --- InfiniLM-SVC static services --------------------------------------------------

_ENTRY = {
    "name": "service_9g8b_8100",
    "host": "127.0.0.1",
    "port": 8100,
    "weight": 1,
    "metadata": {"type": "openai-api", "models": ["9g_8b_thinking"]},
}


@pytest.mark.parametrize(
    "document",
    [
        {"services": [_ENTRY]},
        [_ENTRY],
        {"static_services": [_ENTRY]},
        {"static_services": {"services": [_ENTRY]}},
        {"services": [{**_ENTRY, "metadata": {"model": "9g_8b_thinking"}}]},
        {"services": [{**_ENTRY, "metadata": {"models": ["9g_8b_thinking"]}}]},
        {
            "services": [
                {
                    **_ENTRY,
                    "metadata": {
                        "type": "openai-api",
                        "models_list": [{"id": "9g_8b_thinking", "object": "model"}],
                    },
                }
            ]
        },
    ],
    ids=[
        "services",
        "bare-array",
        "static_services",
        "nested",
        "model-singular",
        "no-type",
        "models_list",
    ],
)
def test_static_services_variants(tmp_path, document):
    path = tmp_path / "services.json"
    path.write_text(json.dumps(document))
    (spec,) = load_static_services(str(path))
    assert spec.name == "service_9g8b_8100"
    assert spec.url == "http://127.0.0.1:8100"
    assert spec.models == ["9g_8b_thinking"]


def test_models_list_keeps_created_and_owned_by(tmp_path):
    path = tmp_path / "services.json"
    card = {"id": "m", "object": "model", "created": 1700000000, "owned_by": "infinilm"}
    odd = {"id": "n", "created": "yesterday", "owned_by": 5}  # not told, in effect
    entry = {**_ENTRY, "metadata": {"type": "openai-api", "models_list": [card, odd]}}
    path.write_text(json.dumps([entry]))
    (spec,) = load_static_services(str(path))
    assert spec.models == ["m", "n"]
    assert [(c.id, c.created, c.owned_by) for c in spec.model_cards] == [
        ("m", 1700000000, "infinilm"),
        ("n", None, None),
    ]


def test_a_url_ending_in_v1_is_taken_without_it():
    spec = parse_backend("http://10.0.0.5:8100/v1/")
    assert (spec.base_url, spec.path_prefix) == ("http://10.0.0.5:8100", "")
    spec = parse_backend("http://10.0.0.5:8100/api/v1")
    assert (spec.base_url, spec.path_prefix) == ("http://10.0.0.5:8100/api", "/api")
    spec = parse_backend("http://10.0.0.5:8100/v1x")
    assert spec.path_prefix == "/v1x"


def test_static_services_without_models_are_discovered(tmp_path):
    path = tmp_path / "services.json"
    path.write_text(json.dumps([{"name": "x", "host": "h", "port": 1}]))
    (spec,) = load_static_services(str(path))
    assert spec.models == []


def test_static_services_skip_other_types(tmp_path):
    path = tmp_path / "services.json"
    path.write_text(
        json.dumps([_ENTRY, {**_ENTRY, "name": "sup", "metadata": {"type": "babysitter"}}])
    )
    assert [s.name for s in load_static_services(str(path))] == ["service_9g8b_8100"]


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ("{", "not valid JSON"),
        ('{"nothing": 1}', "expected a list"),
        ('[{"name": "x"}]', "needs host and port"),
        ('[{"name": "x", "host": "h", "port": "eighty"}]', "entry 0"),
        # RecursionError, not a ConfigError, before the depth was bounded.
        ('[{"metadata": ' + "[" * 1000 + "]" * 1000 + "}]", "nested more than 64 levels"),
    ],
)
def test_static_services_errors(tmp_path, content, names):
    path = tmp_path / "services.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=names):
        load_static_services(str(path))


def test_static_services_end_to_end_with_infinilm_flags(spawn, tmp_path):
    backend = spawn(Mock, "b", ["9g_8b_thinking"])
    path = tmp_path / "services.json"
    entry = {**_ENTRY, "port": backend.port}
    path.write_text(json.dumps({"services": [entry]}))
    router = spawn(
        Router,
        "--static-services",
        str(path),
        "--router-port",
        "0",
        "--health-interval",
        "5",
        "--health-timeout",
        "2",
        "--max-errors",
        "3",
    )
    router.wait_healthy(1)
    resp = router.post("/chat/completions", chat_body("9g_8b_thinking"))
    assert resp.status == 200
    assert router.stats_of("service_9g8b_8100")["request_count"] == 1


# --- the command line -----------------------------------------------------------------


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--backend",
        "--router-port",
        "--static-services",
        "--health-interval",
        "--health-timeout",
        "--max-errors",
        "--connect-timeout",
        "--request-timeout",
        "--retries",
        "--max-body-size",
        "--default-model",
        "--require-model",
        "--config",
        "--demo",
        "--strategy",
        "--api-key",
        "--keepalive-timeout",
        "--header-timeout",
        "--body-timeout",
        "--send-timeout",
    ):
        assert flag in result.stdout
    assert "default: 8000" in result.stdout


def test_bad_flags_fail_with_a_message():
    result = run_cli("--backend", "ftp://x")
    assert result.returncode == 2 and "http://" in result.stderr
    result = run_cli("--health-interval", "0", "--backend", "http://x:1")
    assert result.returncode == 2 and "--health-interval must be > 0" in result.stderr
    result = run_cli("--config", "/nonexistent.toml")
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_unknown_strategy_lists_the_available_ones():
    result = run_cli("--host", "127.0.0.1", "--port", "0", "--strategy", "nope")
    assert result.returncode == 2
    assert "unknown strategy 'nope'" in result.stderr and "round-robin" in result.stderr


def test_list_strategies():
    result = run_cli("--list-strategies")
    assert result.returncode == 0
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert set(lines) >= {
        "round-robin",
        "weighted",
        "least-latency",
        "least-outstanding",
        "power-of-two",
        "affinity",
        "cache-aware",
    }
    assert all(summary.strip() for summary in lines.values())


def test_port_in_use_is_a_clear_error(spawn):
    router = spawn(Router)
    result = run_cli("--host", "127.0.0.1", "--port", str(router.port))
    assert result.returncode == 2 and "cannot listen on" in result.stderr


def test_public_bind_without_keys_warns_once(spawn):
    router = spawn(Router, "--host", "0.0.0.0")
    assert router.output.count("with no API keys") == 1
    keyed = spawn(Router, "--host", "0.0.0.0", env={"LMPROXY_API_KEYS": "k"})
    assert "with no API keys" not in keyed.output
    assert keyed.get("/v1/models").status == 401
    loopback = spawn(Router)
    assert "with no API keys" not in loopback.output


def test_every_flag_is_documented_and_the_documented_file_loads(tmp_path):
    """docs/configuration.md lists every flag --help has, and its TOML example is a
    config the router reads (every key a setting, every value of the right type)."""
    import msgspec

    from lmproxy.cli import build_parser
    from lmproxy.config import Config, load_toml

    doc = (ROOT / "docs" / "configuration.md").read_text()
    flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert flags - {"--help", "--version"} and all(
        f"`{flag}" in doc for flag in flags - {"--help", "--version"}
    ), sorted(f for f in flags if f"`{f}" not in doc)
    section = doc[doc.index("## Config file") :]
    start = section.index("```toml") + len("```toml")
    example = tmp_path / "example.toml"
    example.write_text(section[start : section.index("```", start)])
    values = load_toml(str(example))
    assert {"k8s_selector", "discover_scheme", "kubeconfig"} <= set(values)
    msgspec.convert(values, Config, str_keys=True)  # raises on an unknown key or type


def test_the_policy_examples_are_configs_the_router_takes(tmp_path):
    """README's gateway example and configuration.md's [[keys]] example pass the whole
    check (build_config, as start-up does), not only the types."""
    from lmproxy.config import build_config, load_toml

    blocks = []
    for page, marker in (
        (ROOT / "README.md", "## Gateway policies"),
        (ROOT / "docs" / "configuration.md", "### API keys, limits and priorities"),
    ):
        text = page.read_text()
        section = text[text.index(marker) :]
        start = section.index("```toml") + len("```toml")
        blocks.append(section[start : section.index("```", start)])
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        config = build_config(load_toml(str(path)), {})
        assert config.keys and config.keys[0].name == "team-a"
        assert config.keys[0].digest == __import__("hashlib").sha256(b"secret").digest()
