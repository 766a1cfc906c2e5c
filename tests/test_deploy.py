"""deploy/kubernetes/ as users apply it: every flag, config key, port, probe path and
selector agrees with the router and with the other manifests."""

from __future__ import annotations

import trustme
import yaml
from conftest import ROOT, Mock, Router, wait_until
from test_k8s import HOSTS, ApiServer, kubeconfig

from lmproxy.cli import build_parser, load_config

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
