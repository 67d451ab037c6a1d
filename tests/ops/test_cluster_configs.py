"""cluster/: every manifest against KubeRay's real CRD schemas, the launcher YAML through Ray's own
validation, every command and path they reference against the repository, and the local scripts
against a real private cluster.

The CRD schemas (KubeRay v1, Apache-2.0) lie beside the manifests: cluster/kuberay/crds/.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import yaml

from workflows.cli import build_parser
from workflows.config import check_runs_dir, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
CORE_KINDS = {("v1", "PersistentVolumeClaim"), ("batch/v1", "CronJob")}
LAUNCHER = CLUSTER / "aws" / "loraflow-gpu.yaml"
SUBCOMMANDS = ("run", "retrain", "submit", "jobs", "tune")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML


def crd_dir() -> Path:
    return REPO / "cluster" / "kuberay" / "crds"


def closed(schema: dict) -> dict:
    """The schema as the API server applies it: an object with declared properties takes no others
    (the server prunes or, with strict validation, rejects them) unless it preserves unknown fields."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [closed(s) for s in schema[key]]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((crd_dir() / CRD_FILES[kind]).read_text(), Loader=_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(closed(v1["schema"]["openAPIV3Schema"]))


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted([*CLUSTER.glob("kuberay/*.yaml"), *CLUSTER.glob("schedule/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.relative_to(CLUSTER)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


MANIFESTS = manifests()
RAY_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc["apiVersion"] == "ray.io/v1"]


def cluster_specs(doc: dict) -> dict:
    """The RayCluster spec inside any ray.io manifest."""
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayCronJob": lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]}[doc["kind"]](doc)


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_specs(doc)
    return [("head", spec["headGroupSpec"]["template"]["spec"]),
            *((g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"])]


def errors(kind: str, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]


# ---- KubeRay manifests against the CRDs ----

def test_there_is_a_raycluster_a_rayjob_and_a_raycronjob():
    assert {doc["kind"] for _, doc in RAY_MANIFESTS} == set(CRD_FILES)


@pytest.mark.parametrize(("name", "doc"), RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_manifest_is_valid_against_the_kuberay_crd(name, doc):
    assert errors(doc["kind"], doc) == []


def test_crd_validation_rejects_a_misspelled_field():
    (doc,) = [copy.deepcopy(d) for _, d in RAY_MANIFESTS if d["kind"] == "RayJob"]
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in errors("RayJob", doc))


def test_crd_validation_rejects_a_wrong_type():
    (doc,) = [copy.deepcopy(d) for _, d in RAY_MANIFESTS if d["kind"] == "RayCluster"]
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e and "'two' is not of type 'integer'" in e for e in errors("RayCluster", doc))


def test_every_other_manifest_is_a_core_kind_with_its_required_fields():
    for name, doc in MANIFESTS:
        if doc["apiVersion"] == "ray.io/v1":
            continue
        assert (doc["apiVersion"], doc["kind"]) in CORE_KINDS, name
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["spec"]["accessModes"] and doc["spec"]["resources"]["requests"]["storage"], name
        else:
            assert len(doc["spec"]["schedule"].split()) == 5, name
            assert doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"], name


# ---- what the manifests must say ----

@pytest.mark.parametrize(("name", "doc"), RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_ray_version_and_image_match_the_installed_ray(name, doc):
    assert cluster_specs(doc)["rayVersion"] == ray.__version__
    for _, pod in pod_specs(doc):
        for container in pod["containers"]:
            assert container["image"].endswith(f"-ray{ray.__version__}"), container["image"]
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile


@pytest.mark.parametrize(("name", "doc"), RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_token_auth_is_on_with_a_named_secret(name, doc):
    assert cluster_specs(doc)["authOptions"] == {"mode": "token", "secretName": "loraflow-ray-token"}


@pytest.mark.parametrize(("name", "doc"), RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_a_worker_group_has_gpus(name, doc):
    workers = [c for group, pod in pod_specs(doc)[1:] for c in pod["containers"]]
    assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in workers)


def _mounts(pod: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there (every mount must name a declared volume)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for c in pod["containers"] for m in c["volumeMounts"]}


@pytest.mark.parametrize(("name", "doc"), RAY_MANIFESTS, ids=[n for n, _ in RAY_MANIFESTS])
def test_every_pod_mounts_shared_storage_and_shm_and_the_head_the_registry(name, doc):
    for group, pod in pod_specs(doc):
        mounts = _mounts(pod)
        assert mounts["/mnt/shared"]["persistentVolumeClaim"]["claimName"] == "loraflow-shared", group
        assert mounts["/dev/shm"]["emptyDir"] == {"medium": "Memory"}, group
    head_mounts = _mounts(pod_specs(doc)[0][1])
    assert head_mounts["/mnt/registry"]["persistentVolumeClaim"]["claimName"] == "loraflow-registry"


def test_claims_the_manifests_mount_are_defined_in_storage_yaml():
    defined = {doc["metadata"]["name"] for _, doc in MANIFESTS if doc["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for _, doc in RAY_MANIFESTS for _, pod in pod_specs(doc)
            for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert used <= defined
    access = {doc["metadata"]["name"]: doc["spec"]["accessModes"] for _, doc in MANIFESTS
              if doc["kind"] == "PersistentVolumeClaim"}
    assert access["loraflow-shared"] == ["ReadWriteMany"]  # every node writes shards and checkpoints


def test_secrets_and_configmaps_referenced_are_created_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    text = "\n".join(p.read_text() for p in [*CLUSTER.glob("kuberay/*.yaml"), *CLUSTER.glob("schedule/*.yaml")])
    secrets = set(re.findall(r"secretName: (\S+)", text)) | set(re.findall(r"secretKeyRef: \{name: ([\w-]+)", text))
    configmaps = set(re.findall(r"configMap: \{name: ([\w-]+)", text))
    assert secrets and configmaps
    for name in secrets:
        assert re.search(rf"kubectl create secret generic {name} --from-literal=auth_token=", readme), name
    for name in configmaps:
        assert f"kubectl create configmap {name} --from-file=configs/" in readme, name


# ---- every loraflow command they run, through the real CLI parser and config loader ----

def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv from `loraflow` on) for every loraflow command in cluster/ and its README."""
    found: list[tuple[str, list[str]]] = []
    for name, doc in MANIFESTS:
        if doc["kind"] == "RayJob":
            found.append((name, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            found.append((name, shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
        elif doc["kind"] == "CronJob":
            for c in doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
                found.append((name, c["command"]))
    for path in sorted(CLUSTER.rglob("*")):
        if path.suffix in (".yaml", ".example", ".md"):
            found += [(str(path.relative_to(REPO)), argv) for argv in _commands_in_text(path)]
    return found


def _commands_in_text(path: Path) -> list[list[str]]:
    """Commands written for people: README code blocks, YAML comments, crontab lines."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))
    elif path.suffix == ".yaml":
        text = "\n".join(line.lstrip()[1:] for line in text.splitlines() if line.lstrip().startswith("#"))
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    commands = []
    pattern = re.compile(rf"(^|[\s/])loraflow ({'|'.join(SUBCOMMANDS)}) ")
    for line in filter(pattern.search, text.splitlines()):
        argv = shlex.split(line.lstrip("# "))
        starts = [i for i, a in enumerate(argv[:-1]) if Path(a).name == "loraflow" and argv[i + 1] in SUBCOMMANDS]
        for start in starts:
            end = next((i for i, a in enumerate(argv) if i > start and a in (">>", ">", "&&", "|", ";", "&")), None)
            commands.append(argv[start:end])
    return commands


COMMANDS = _command_lines()


def test_the_commands_cover_every_place_that_runs_loraflow():
    places = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"kuberay/rayjob.yaml", "schedule/raycronjob.yaml", "schedule/cronjob.yaml", "cluster/README.md",
            "cluster/schedule/crontab.example", "cluster/aws/loraflow-gpu.yaml", "cluster/kuberay/raycluster.yaml"} <= places


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}:{' '.join(a[:3])}" for w, a in COMMANDS])
def test_command_parses_and_its_config_and_overrides_load(where, argv):
    assert argv[0].endswith("loraflow")
    args = build_parser().parse_args(argv[1:])
    if args.command == "jobs":
        return  # takes a job id, no config
    config = Path(args.config)
    # In the pods the image's (or ConfigMap's) configs are at /configs; elsewhere paths are from the repo root.
    local = REPO / "configs" / config.name if str(config).startswith("/configs/") else REPO / config
    assert local.is_file(), f"{where}: {config} is not in the repository"
    overrides = getattr(args, "overrides", None) or getattr(args, "set", None) or []
    check_runs_dir(load_config(local, overrides))  # run records stay on a path, never s3://


def test_dockerfile_copies_only_paths_that_exist():
    for line in (CLUSTER / "kuberay" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            sources = [a for a in shlex.split(line)[1:-1] if not a.startswith("--")]
            assert all((REPO / s).exists() for s in sources), line


# ---- the cluster launcher YAML, through Ray's own validation ----

def _launcher_validates(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does


def test_launcher_yaml_passes_rays_own_validation():
    _launcher_validates(yaml.safe_load(LAUNCHER.read_text()))


def test_launcher_validation_rejects_an_unknown_key():
    config = yaml.safe_load(LAUNCHER.read_text())
    config["max_wokers"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        _launcher_validates(config)


def test_launcher_uses_the_installed_ray_on_gpu_workers_and_mounts_the_repo():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    local_sources = [src for src in config["file_mounts"].values() if not src.startswith("~")]
    assert local_sources and all((REPO / src).exists() for src in local_sources)


# ---- cluster/local scripts on a real private cluster ----

def test_local_scripts_are_posix_shell():
    for script in sorted((CLUSTER / "local").glob("*.sh")):
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0, script
        commands = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any("ray stop" in line for line in commands), script  # it would stop every cluster


@pytest.mark.train_group
def test_local_scripts_start_a_head_and_worker_and_stop_exactly_them(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "LORAFLOW_LOCAL_STATE": str(tmp_path / "state.json")}
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # someone else's process
    try:
        started = subprocess.run([str(CLUSTER / "local" / "start.sh"), "--num-cpus", "1", "--workers", "1",
                                  "--auth-mode", "disabled"], env=env, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        assert "1 extra worker node(s)" in started.stdout
        status = subprocess.run([str(CLUSTER / "local" / "status.sh")], env=env, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        state = yaml.safe_load(status.stdout)
        tree = [psutil.Process(n["pid"]) for n in [state["head"], *state["workers"]]]
        tree += [c for p in tree for c in p.children(recursive=True)]

        stopped = subprocess.run([str(CLUSTER / "local" / "stop.sh")], env=env, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_every_scheduled_or_one_shot_run_has_a_deadline():
    deadlines = {}
    for name, doc in MANIFESTS:
        if doc["kind"] in ("RayJob", "RayCronJob", "CronJob"):
            spec = {"RayJob": lambda d: d["spec"], "RayCronJob": lambda d: d["spec"]["jobTemplate"],
                    "CronJob": lambda d: d["spec"]["jobTemplate"]["spec"]}[doc["kind"]](doc)
            deadlines[name] = spec.get("activeDeadlineSeconds")
    assert deadlines and all(isinstance(s, int) and s > 0 for s in deadlines.values()), deadlines
