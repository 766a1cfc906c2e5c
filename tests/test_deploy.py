"""deploy/kubernetes/ as users apply it: every flag, config key, port, probe path and
selector agrees with the router and with the other manifests."""

from __future__ import annotations

import json
import tomllib

import trustme
import yaml
from conftest import ROOT, Mock, Router, wait_until
from test_k8s import HOSTS, ApiServer, kubeconfig

from lmproxy.cli import build_parser, load_config
from lmproxy.config import Config

DEPLOY = ROOT / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_the_manifests_agree_with_each_other_and_with_the_router(tmp_path):
    m = manifests()
    deployment, service = m["Deployment/lmproxy"], m["Service/lmproxy"]
    config_map, budget = m["ConfigMap/lmproxy"], m["PodDisruptionBudget/lmproxy"]
    engines = m["Service/vllm-engines"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert budget["spec"]["selector"]["matchLabels"] == labels
    # Every flag in the container's args is one lmproxy --help lists.
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert all(arg in flags for arg in container["args"] if arg.startswith("--"))
    # The config file loads as the router loads it, and listens where the pod says.
    toml = tmp_path / "lmproxy.toml"
    toml.write_text(config_map["data"]["lmproxy.toml"])
    config = load_config(["--config", str(toml)])
    assert config is not None
    (port,) = container["ports"]
    assert port["containerPort"] == config.port
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.shutdown_timeout
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"][container["args"].index("--config") + 1].startswith(mount)
    # Kubernetes discovery: the ConfigMap's selector picks the pods the engines'
    # Service selects, at their port, and the pod's ServiceAccount may watch them.
    engine_labels = {k: v for k, _, v in (t.partition("=") for t in config.k8s_selector)}
    assert engines["spec"]["selector"] == engine_labels
    assert engines["spec"]["clusterIP"] == "None"  # the DNS alternative, commented there
    assert engines["spec"]["ports"][0]["targetPort"] == config.k8s_port
    account = pod["spec"]["serviceAccountName"]
    assert m[f"ServiceAccount/{account}"]
    binding = next(d for k, d in m.items() if k.startswith("RoleBinding/"))
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    role = m[f"Role/{binding['roleRef']['name']}"]
    assert any(
        "pods" in rule["resources"] and {"get", "list", "watch"} <= set(rule["verbs"])
        for rule in role["rules"]
    )


def test_the_probe_paths_are_served(spawn, tmp_path):
    """The router started from the ConfigMap's file answers both probes: alive at once,
    ready only once a pod its selector picks is Ready and healthy. The API server is
    the stand-in, reached through a kubeconfig as the pod's service account would be."""
    container = manifests()["Deployment/lmproxy"]["spec"]["template"]["spec"]["containers"][0]
    toml = tmp_path / "lmproxy.toml"
    toml.write_text(manifests()["ConfigMap/lmproxy"]["data"]["lmproxy.toml"])
    ca = trustme.CA()
    api = spawn(ApiServer, ca, tmp_path)
    engine = spawn(Mock, "engine", ["Qwen3-32B"], "--host", HOSTS[0])
    router = spawn(
        Router,
        "--config", str(toml),
        "--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", ca, api.port)),
        "--k8s-port", str(engine.port),  # the engine's own port, not 8000 here
        "--health-interval", "0.5",
    )  # fmt: skip
    wait_until(lambda: router.get("/liveness").status == 200, 10, "the router")
    ready = container["readinessProbe"]["httpGet"]["path"]
    assert router.get(container["livenessProbe"]["httpGet"]["path"]).status == 200
    assert router.get(ready).status == 503
    api.put("vllm-0", HOSTS[0])
    wait_until(lambda: router.get(ready).status == 200, 10, "ready once an engine pod is")


# --- the image: the Dockerfile, as a container engine would read it -------------------
# No container engine can pull a base image where lmproxy is tested, so the image is not
# built here: what can drift (the user, the entrypoint, the port, the health path, the
# install step) is checked against the router, the manifests and README instead.


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, (INSTRUCTION, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = arguments.split()[-1] if " AS " in arguments.upper() else str(len(stages))
            current = stages.setdefault(name, [])
        current.append((instruction, arguments.strip()))
    return stages


def readme_install_command() -> str:
    """README's quick-start install step: the `pip install ...` of its first command."""
    readme = (ROOT / "README.md").read_text()
    first = readme.split("```sh\n", 1)[1].split("\n", 1)[0]
    (step,) = [part.strip() for part in first.split("&&") if part.strip().startswith("pip ")]
    return step


def test_the_image_runs_the_router_as_it_is_installed_and_probed():
    stages = dockerfile_stages()
    assert list(stages) == ["build", "runtime"], stages.keys()
    runtime = stages["runtime"]
    # Not root: a USER that names neither root nor uid 0.
    users = [args for op, args in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # The entrypoint is a console script the package installs.
    (entrypoint,) = [args for op, args in runtime if op == "ENTRYPOINT"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entrypoint)[0] in scripts, entrypoint
    # The port and the health path are the router's defaults and the Deployment's.
    defaults = Config()
    (exposed,) = [args for op, args in runtime if op == "EXPOSE"]
    (health,) = [args for op, args in runtime if op == "HEALTHCHECK"]
    container = manifests()["Deployment/lmproxy"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(exposed) == defaults.port == ports["http"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    assert f"http://127.0.0.1:{defaults.port}/liveness" in health
    # Nothing of the build in the final stage: it copies the built environment only.
    runs = " ".join(args for op, args in runtime if op == "RUN")
    assert "pip" not in runs and "gcc" not in runs and "apt-get" not in runs, runs
    copies = [args for op, args in runtime if op == "COPY"]
    assert copies and all(c.startswith("--from=build ") for c in copies), copies
    # The build stage installs lmproxy with README's own command, so the two cannot drift.
    build_runs = [args for op, args in stages["build"] if op == "RUN"]
    assert readme_install_command() in build_runs, (readme_install_command(), build_runs)
    # The Python version is a build argument, the same for both stages.
    assert all("${PYTHON_VERSION}" in args for op, args in (stages["build"][0], runtime[0]))


def test_the_deployment_names_the_image_as_published():
    container = manifests()["Deployment/lmproxy"]["spec"]["template"]["spec"]["containers"][0]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"ghcr.io/lmproxy/lmproxy:{version}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "bench"} <= set(ignored)
