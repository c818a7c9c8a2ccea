"""The cluster examples people copy: the Ray cluster launcher YAML validates against the schema Ray ships, and the
orchestrate.py command each example runs parses with orchestrate.py's own parser (so a renamed flag breaks here)."""

import copy
import shlex
from pathlib import Path

import pytest
import yaml

import orchestrate

CLUSTER = Path(__file__).resolve().parent.parent / "examples" / "cluster"


def _orchestrate_args(command: str):
    words = shlex.split(command)
    assert Path(words[1]).name == "orchestrate.py", command
    return orchestrate.build_parser().parse_args(words[2:])


def test_the_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill in the provider's defaults, then validate
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 1  # not a field of a node type: the schema must say so
    with pytest.raises(Exception, match="gpus"):
        validate_config(prepare_config(broken))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 1 and config["available_node_types"]["head"]["resources"]["GPU"] == 0
    args = _orchestrate_args(config["metadata"]["ASTCV_COMMAND"])
    assert args.address == "auto" and str(args.storage_path).startswith("s3://")


def test_the_kuberay_rayjob_runs_orchestrate_on_gpu_workers_of_the_tested_ray():
    import ray

    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__  # the version CI pins and tests
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = _orchestrate_args(spec["entrypoint"])
    assert args.address is None or args.address == ""  # ray job submit sets RAY_ADDRESS: the run joins that cluster
    assert str(args.storage_path).startswith("s3://")
