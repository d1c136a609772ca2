"""cluster/: the AWS launcher config passes Ray's own validation, the KubeRay manifests have the
fields KubeRay requires (GPU worker group, autoscaling, token authentication), the RayJob runs a
valid clipbatch command on a valid spec, and every file names the Ray version installed here."""

from __future__ import annotations

import copy
import shlex
from importlib.metadata import entry_points
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from clipbatch.cli import main
from clipbatch.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _load_aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _docs(name: str) -> dict[str, dict]:
    """The manifests in cluster/kuberay/NAME by kind."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_aws_launcher_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load_aws()
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it validates
    validate_config(config)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU instance
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu[0]["min_workers"] < gpu[0]["max_workers"]  # autoscaling
    assert ray.__version__ in config["docker"]["image"]
    # clipbatch from this checkout on every node, and token authentication on every node.
    assert config["file_mounts"]["~/clipbatch"] == "."
    assert any(c.startswith("pip install") and "~/clipbatch" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert len(start) == 1 and "export RAY_AUTH_MODE=token;" in start[0]

    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu-worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(typo))


def _check_ray_cluster_spec(spec: dict) -> None:
    """What KubeRay's RayCluster CRD requires, and what a clipbatch GPU cluster needs."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["name"] and head_container["image"]
    assert {"containerPort": 8265, "name": "dashboard"} in head_container["ports"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] and isinstance(group["rayStartParams"], dict)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["minReplicas"] < \
        group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["name"] and worker["image"] == head_container["image"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["resources"]["requests"] == worker["resources"]["limits"]


def test_kuberay_raycluster():
    cluster = _docs("raycluster.yaml")["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    _check_ray_cluster_spec(cluster["spec"])


def test_kuberay_rayjob_runs_a_valid_clipbatch_command_on_a_valid_spec(capsys):
    docs = _docs("rayjob.yaml")
    job, config_map = docs["RayJob"], docs["ConfigMap"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])

    # The spec: the ConfigMap mounted into the head, valid, and the same as jobs/cluster.yaml.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = head["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (mount,) = head["containers"][0]["volumeMounts"]
    assert mount["name"] == volume["name"]
    (key,) = config_map["data"]
    spec_text = config_map["data"][key]
    load_spec(yaml.safe_load(spec_text))
    assert yaml.safe_load(spec_text) == yaml.safe_load((ROOT / "jobs" / "cluster.yaml").read_text())

    # The entrypoint: the installed console script, on the mounted spec, through clipbatch's own
    # argparse. A --set without '=' is the first thing `run` rejects after parsing, so a 2 with that
    # message means the command line parsed and reached the command; a bad one exits in argparse.
    argv = shlex.split(job["spec"]["entrypoint"])
    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.value == "clipbatch.cli:main"}
    assert argv[0] in scripts and argv[1:] == ["run", f"{mount['mountPath']}/{key}"]
    assert main(argv[1:] + ["--set", "parsed"]) == 2
    assert "--set expects key.path=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--bogus-flag", argv[2]])


def test_dockerfile_builds_on_the_installed_ray():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    base = next(line for line in lines if line.startswith("FROM "))
    assert base.startswith(f"FROM rayproject/ray:{ray.__version__}-") and base.endswith("-gpu")
    assert any(line.startswith("RUN pip install") and "/tmp/clipbatch" in line for line in lines)
