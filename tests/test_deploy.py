"""deploy/kubernetes/ as users apply it: every flag, config key, port, probe path and
selector agrees with the router and with the other manifests."""

from __future__ import annotations

import yaml
from conftest import ROOT, Router, wait_until

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
    # The engines' headless Service is the name --discover reads, at its port.
    assert engines["spec"]["clusterIP"] == "None"
    (target,) = config.discover
    assert target.startswith(f"dns://{engines['metadata']['name']}.")
    assert target.endswith(f":{engines['spec']['ports'][0]['port']}")


def test_the_probe_paths_are_served(spawn, tmp_path):
    """The router started from the ConfigMap's file answers both probes: alive, and not
    ready while no engine is found (here no cluster DNS answers)."""
    container = manifests()["Deployment/lmproxy"]["spec"]["template"]["spec"]["containers"][0]
    toml = tmp_path / "lmproxy.toml"
    toml.write_text(manifests()["ConfigMap/lmproxy"]["data"]["lmproxy.toml"])
    router = spawn(Router, "--config", str(toml), "--port", "0")
    wait_until(lambda: router.get("/liveness").status == 200, 10, "the router")
    assert router.get(container["livenessProbe"]["httpGet"]["path"]).status == 200
    assert router.get(container["readinessProbe"]["httpGet"]["path"]).status == 503
