"""deploy/: the compose file against the Compose spec, the Kubernetes manifests against Kubernetes' schemas,
and the files agreeing with each other and with `marserve serve` (variables that name real flags, mounts
that exist, the torch pin of pyproject.toml)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marserve.cli import build_parser
from marserve.commands.env_flags import env_name

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra)")
pytest.importorskip("check_jsonschema", reason="check-jsonschema (the test extra)")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _serve_variables() -> set[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return {env_name(a) for a in serve._actions if a.dest != "help"}


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    # check-jsonschema carries the Compose spec's schema (vendor.compose-spec), so no network is needed.
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_passes_the_compose_spec_schema():
    out = _check_compose(DEPLOY / "compose.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_compose_schema_check_refuses_a_misspelt_key(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["marserve"]["portz"] = compose["services"]["marserve"].pop("ports")
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose))
    out = _check_compose(bad)
    assert out.returncode != 0 and "portz" in out.stdout + out.stderr


def test_compose_wires_prometheus_and_grafana_to_marserve():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"marserve", "prometheus", "grafana"}
    assert set(services["marserve"]["environment"]) <= _serve_variables()
    assert (REPO / services["marserve"]["build"]["dockerfile"]).is_file()
    for service in services.values():  # every file or folder the services mount from deploy/ is there
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    port = services["marserve"]["ports"][0].split(":")[-1]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == [f"marserve:{port}"]
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/marserve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


def _resources(path: Path) -> list[dict]:
    return [r for r in yaml.safe_load_all(path.read_text()) if r]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(path):
    for resource in _resources(path):
        # strict: unknown fields are errors too (a misspelt field is otherwise silently ignored by kubectl)
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_check_refuses_a_wrong_field():
    deployment = copy.deepcopy(_resources(DEPLOY / "kubernetes" / "deployment.yaml")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    deployment = copy.deepcopy(_resources(DEPLOY / "kubernetes" / "deployment.yaml")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def _deployments() -> dict[str, dict]:
    return {r["metadata"]["name"]: r for p in K8S for r in _resources(p) if r["kind"] == "Deployment"}


def test_deployments_probe_limit_and_run_as_non_root():
    deployments = _deployments()
    assert set(deployments) == {"marserve", "marserve-gpu"}
    variables = _serve_variables()
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        for var in container["env"]:  # a misspelt MARSERVE_ variable would be ignored by marserve
            if var["name"].startswith("MARSERVE_"):
                assert var["name"] in variables, (name, var["name"])
            assert "value" not in var or "KEY" not in var["name"], "secrets come from a Secret"
    gpu = deployments["marserve-gpu"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in deployments["marserve"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    service = _resources(DEPLOY / "kubernetes" / "service.yaml")[0]
    for deployment in deployments.values():  # the Service reaches the pods of either
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pin_torch_as_pyproject_and_bake_in_no_secret(name):
    text = (DEPLOY / name).read_text()
    (pin,) = re.findall(r'^\s*"torch==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pin)}$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:\S+-slim", text, re.M)  # before the first FROM, for every stage
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/health", text, re.M)
    assert re.search(r"^USER [1-9][0-9]*$", text, re.M)  # numeric, so that runAsNonRoot can check it
    env_lines = " ".join(re.findall(r"^ENV (?:.*\\\n)*.*$", text, re.M))
    assert "API_KEY" not in env_lines and "PASSWORD" not in env_lines
    for variable in re.findall(r"\b(MARSERVE_[A-Z_]+)=", env_lines):
        assert variable in _serve_variables() | {"MARSERVE_KERNEL_CACHE"}, variable
