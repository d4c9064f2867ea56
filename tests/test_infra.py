"""What can be checked of the cluster definitions without Docker or Kubernetes: the image is built
on the locked Ray and Python, the GPU lock has everything the CUDA torch needs, the manifests are
well-formed resources of the kinds and fields KubeRay knows, `ray up`'s config passes Ray's own
schema, and every command they run exists in this project."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from packaging.requirements import Requirement

from pipeline.runtime.mlflow_server import MLFLOW_SERVER_VARIABLES
from tests.dvc_helpers import ROOT

INFRA = ROOT / "infra"
LINUX_X86_64_PY311 = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
                      "python_version": "3.11", "python_full_version": "3.11.0", "os_name": "posix",
                      "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def pins(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def lock_python_version() -> str:
    return re.search(r"--python-version (\S+)", (INFRA / "scripts/lock.sh").read_text()).group(1)


def dockerfile_arguments() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", (INFRA / "docker/Dockerfile").read_text(), flags=re.MULTILINE))


# --- image and locks --------------------------------------------------------------------------

def test_image_base_matches_the_locks():
    arguments = dockerfile_arguments()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$",
                     (INFRA / "docker/Dockerfile").read_text(), flags=re.MULTILINE)
    for lock in ("requirements.lock", "requirements-gpu.lock"):
        assert pins(ROOT / lock)["ray"] == arguments["RAY_VERSION"], lock
    assert arguments["PYTHON_TAG"] == "py" + lock_python_version().replace(".", "")
    assert arguments["VARIANT"] == "cpu"  # and `--build-arg VARIANT=gpu` picks the GPU lock:
    assert 'if [ "$VARIANT" = gpu ]; then lock=requirements-gpu.lock' in (INFRA / "docker/Dockerfile").read_text()


def test_locks_agree_except_for_torch_and_its_cuda_libraries():
    cpu, gpu = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-gpu.lock")
    assert cpu["torch"].endswith("+cpu") and "+" not in gpu["torch"]
    assert cpu["torch"].split("+")[0] == gpu["torch"]
    assert {name: v for name, v in cpu.items() if gpu.get(name) != v} == {"torch": cpu["torch"]}


def test_gpu_lock_has_every_library_the_cuda_torch_requires():
    gpu = pins(ROOT / "requirements-gpu.lock")
    recorded = json.loads((INFRA / "locks/gpu-requires.json").read_text())
    assert f"torch=={gpu['torch']}" in recorded, "infra/locks/gpu-requires.json is for another torch: rerun lock.sh"
    checked = []

    def require(line: str, extras: set[str]) -> None:
        requirement = Requirement(line)
        applies = requirement.marker is None or any(
            requirement.marker.evaluate({**LINUX_X86_64_PY311, "extra": extra}) for extra in (extras or {""}))
        if not applies:
            return
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in gpu, f"requirements-gpu.lock lacks {line}"
        assert requirement.specifier.contains(gpu[name], prereleases=True), f"{name}=={gpu[name]} does not meet {line}"
        checked.append(name)
        if requirement.extras:
            nested = recorded[f"{requirement.name}=={gpu[name]}"]
            for nested_line in nested:
                require(nested_line, set(requirement.extras))

    for line in recorded[f"torch=={gpu['torch']}"]:
        require(line, set())
    cuda = [n for n in checked if n.startswith("nvidia-")]
    assert "triton" in checked and "nvidia-cudnn-cu13" in cuda and "nvidia-cublas" in cuda and len(cuda) >= 10, checked


# --- KubeRay ------------------------------------------------------------------------------------

# Field names of the ray.io/v1 resources used here (KubeRay v1.5 CRDs); a typo is silently dropped
# by `kubectl apply` for unknown fields of a CRD, so it is caught here instead.
RAY_CLUSTER_SPEC = {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
                "idleTimeoutSeconds", "suspend", "numOfHosts"}
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy", "env",
                      "envFrom", "securityContext", "volumeMounts", "version"}
RAY_JOB_SPEC = {"entrypoint", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
                "ttlSecondsAfterFinished", "runtimeEnvYAML", "jobId", "submitterPodTemplate", "submissionMode",
                "activeDeadlineSeconds", "backoffLimit", "entrypointNumCpus", "entrypointNumGpus",
                "entrypointResources", "suspend", "deletionStrategy", "managedBy", "submitterConfig", "metadata"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kuberay(kind: str) -> dict:
    found = [d for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in documents(p) if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} found"
    return found[0]


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    for container in containers:
        assert container["image"].startswith("hmsa-pipeline:"), where
        for source in container.get("envFrom", []):
            assert set(source) <= {"configMapRef", "secretRef"}, where
        for variable in container.get("env", []):  # credentials only by reference
            assert "value" not in variable or not re.search(r"KEY|SECRET|PASSWORD|TOKEN", variable["name"]), where
    return containers


def test_raycluster_autoscales_gpu_workers_with_auth_on():
    cluster = kuberay("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= RAY_CLUSTER_SPEC and set(spec["headGroupSpec"]) <= HEAD_GROUP
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    assert spec["rayVersion"] == pins(ROOT / "requirements.lock")["ray"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True  # without it maxReplicas does nothing
    head = check_pod_template(spec["headGroupSpec"]["template"], "head")[0]
    assert head["image"] == "hmsa-pipeline:cpu" and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker = check_pod_template(group["template"], group["groupName"])[0]
        assert worker["image"] == "hmsa-pipeline:gpu" and worker["resources"]["limits"]["nvidia.com/gpu"]
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())


def test_rayjob_runs_the_whole_pipeline_on_the_cluster():
    job = kuberay("RayJob")
    assert job["apiVersion"] == "ray.io/v1" and set(job["spec"]) <= RAY_JOB_SPEC
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == kuberay("RayCluster")["metadata"]["name"]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "bash" and command[1].startswith("/home/ray/hmsa/")
    script = ROOT / command[1].removeprefix("/home/ray/hmsa/")
    text = script.read_text()
    for step in ("dvc pull", "dvc repro", "dvc push", "python -m pipeline.save_results"):
        assert step in text, f"{script.name} does not run {step}"
    assert (ROOT / "pipeline/save_results.py").is_file()
    assert dockerfile_workdir() == "/home/ray/hmsa"
    # `kubectl create` makes a run of its own each time; a named RayJob that has finished is not
    # run again when it is applied again
    assert "generateName" in job["metadata"] and "name" not in job["metadata"]


def test_the_cluster_keeps_everything_in_its_own_bucket():
    """Checkpoints, MLflow artifacts and the DVC remote in one bucket of the cluster's: the image's
    .dvc/config names the local stack's, so the job points DVC at the cluster's own."""
    variables = kuberay("ConfigMap")["data"]
    buckets = {key: urlsplit(variables[key]).netloc for key in ("HMSA_STORAGE", "MLFLOW_ARTIFACTS_DESTINATION",
                                                                 "DVC_REMOTE_URL")}
    assert len(set(buckets.values())) == 1, buckets
    remote = re.search(r'\[core\]\s+remote = (\S+)', (ROOT / ".dvc/config").read_text()).group(1)
    script = (INFRA / "scripts/cluster_job.sh").read_text()
    assert f'dvc remote modify --local {remote} url "$DVC_REMOTE_URL"' in script
    assert script.index("DVC_REMOTE_URL") < script.index("dvc pull")


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (INFRA / "docker/Dockerfile").read_text(), flags=re.MULTILINE).group(1)


def test_mlflow_server_has_auth_s3_artifacts_and_real_options(monkeypatch):
    deployment, service = kuberay("Deployment"), kuberay("Service")
    container = check_pod_template(deployment["spec"]["template"], "mlflow")[0]
    assert container["command"] == ["mlflow", "server"]
    arguments = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), True)
                     for a in container["args"])
    assert arguments["app-name"] == "basic-auth" and arguments["serve-artifacts"] is True
    assert arguments["artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    help_text = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "server", "--help"],
                               capture_output=True, text=True).stdout
    for name in arguments:
        assert f"--{name}" in help_text, f"mlflow server has no option --{name}"
    env = {v["name"]: v for v in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    for name, value in MLFLOW_SERVER_VARIABLES.items():  # as the local stack's and the tests' servers
        assert env[name]["value"] == value, name
    auth_ini = ROOT / env["MLFLOW_AUTH_CONFIG_PATH"]["value"].removeprefix(dockerfile_workdir() + "/")
    assert "admin_password" not in auth_ini.read_text().replace("# admin_password", "")
    # A successful credential check is cached, as MLflow reads the file: uncached, every request
    # (several per epoch per run) costs the server a scrypt hash, about 0.1 CPU-s.
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(auth_ini))
    assert read_auth_config().auth_cache_ttl_seconds > 0
    config_map = kuberay("ConfigMap")
    assert config_map["data"]["MLFLOW_TRACKING_URI"].startswith(f"http://{service['metadata']['name']}:")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


# --- ray up ---------------------------------------------------------------------------------------

def test_ray_up_config_passes_rays_schema_and_runs_existing_things():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["head_image"] == "hmsa-pipeline:cpu"
    assert config["docker"]["worker_image"] == "hmsa-pipeline:gpu"
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert config["file_mounts"]["~/hmsa"] == "."
    head = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head and "RAY_AUTH_MODE=token" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    usage = (INFRA / "ray/cluster.yaml").read_text()
    for script in re.findall(r"bash (infra/[\w/.-]+)", usage):
        assert (ROOT / script).is_file(), script


def test_commands_in_infra_name_existing_modules_and_stages():
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    texts = [p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".sh", ""}]
    texts += [p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]]
    for text in texts:
        for module in re.findall(r"python -m (pipeline\.\w+)", text):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        for line in re.findall(r"^\s*dvc (?:repro|exp run)\b([^#\n]*)", text, flags=re.MULTILINE):
            words = [
                w
                for w in shlex.split(line.replace("\\", " "))
                if not w.startswith("-") and "=" not in w and "$" not in w
            ]
            names = [w for w in words if re.fullmatch(r"[a-z][\w-]*", w)]
            for stage in names[-1:]:  # the target, after options and their values
                assert stage in stages, f"a command names the stage {stage!r}, which dvc.yaml lacks: {line}"


def test_make_test_starts_the_longest_modules_first():
    """`make test` runs whole modules in two xdist processes; a long module that starts last runs
    alone at the end. conftest.LONGEST_FIRST orders them, and xdist must not reorder them by their
    number of tests (its default, which sends the long single-test modules last)."""
    from tests.conftest import LONGEST_FIRST

    recipe = re.search(r"^test: .*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE).group(1)
    assert "--dist loadfile" in recipe and "--no-loadscope-reorder" in recipe, recipe
    modules = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    assert set(LONGEST_FIRST) <= modules, set(LONGEST_FIRST) - modules  # a renamed module keeps its place


def test_make_installs_the_lock_with_a_pinned_uv_and_compiled_bytecode():
    """The install that `make repro` and `make test` start with on a fresh machine: pip unpacked and
    byte-compiled the lock one file at a time (95 s on 2 cores); uv installs it in about 30. uv
    compiles no bytecode unless asked, and where Python writes none (PYTHONDONTWRITEBYTECODE) every
    process would compile its imports again. The machine's local wheels (PIP_FIND_LINKS) stay found."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, flags=re.MULTILINE).group(1)
    version = re.search(r"^UV_VERSION := (\d+\.\d+\.\d+)$", text, flags=re.MULTILINE)
    assert version and "pip install" in recipe and "uv==$(UV_VERSION)" in recipe, recipe  # uv itself, pinned
    (lock_install,) = [line for line in recipe.splitlines() if "-r requirements.lock" in line]
    assert "uv pip install" in lock_install and "--no-deps" in lock_install, lock_install
    assert "--compile-bytecode" in lock_install and "PIP_FIND_LINKS" in recipe, recipe
    if (Path(sys.prefix) / ".installed").exists():  # this environment is the one make installed
        import torch

        compiled = Path(torch.__file__).parent / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
        assert compiled.is_file(), compiled


def test_processes_the_tests_start_let_idle_openmp_threads_sleep():
    """Two test processes and the stages they start share the cores: OpenMP threads spinning while
    they wait took CPU time from the others' work. Every process the tests start inherits the
    setting of tests/conftest.py (PASSIVE, or the user's own)."""
    import os
    import subprocess
    import sys

    from tests.services import python_env

    seen = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                          capture_output=True, text=True, env=python_env(), check=True).stdout.strip()
    assert seen == os.environ.get("OMP_WAIT_POLICY") and seen not in ("None", ""), seen


def test_ports_chosen_ahead_of_a_listener_are_out_of_reach_of_outgoing_connections():
    """A port picked for a service (a stand-in cluster's GCS, a test's MLflow server) is free when
    picked and bound by the service a moment later. From the kernel's range for outgoing connections
    (what binding port 0 gives), any connection opened in between can take it: on a machine busy
    with Ray that happened, and a stand-in cluster never came up. Ray nodes bind their other
    listeners themselves (RAY_NODE_PORTS_OF_ITS_OWN): no fixed default port two nodes would share."""
    import socket

    from pipeline.runtime.ports import LOWEST, RAY_NODE_PORTS_OF_ITS_OWN, free_local_port

    outgoing_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [free_local_port() for _ in range(50)]
    assert all(LOWEST <= port < outgoing_from for port in picked), picked
    assert len(set(picked)) > 40, picked  # random: two processes picking at once rarely meet
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", picked[0]))  # free indeed
    assert {"--min-worker-port=0", "--max-worker-port=0", "--dashboard-agent-listen-port=0"} <= set(
        RAY_NODE_PORTS_OF_ITS_OWN)


def test_a_stand_in_node_that_exits_fails_the_start_at_once_with_its_log(tmp_path):
    """infra/local/stack.py start: a Ray node whose `ray start` ends fails the start with that
    node's log, instead of a 3-minute wait that ends with the head's log (which says nothing)."""
    import subprocess
    import sys

    import pytest

    from pipeline.runtime.ports import free_local_port

    stack = stand_in_stack().Stack(tmp_path)
    (tmp_path / "stack.json").write_text(json.dumps({"ports": {"ray": free_local_port()}, "token": "t" * 32,
                                                     "access_key": "k", "secret_key": "s"}))
    (tmp_path / "ray-node-1.log").write_text("raylet: bind: address already in use\n")
    node = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit) as failed:
        stack._wait_for_nodes(2, started={"ray-node-1": node})
    assert "ray-node-1 exited (3) before the cluster was up" in str(failed.value), failed.value
    assert "address already in use" in str(failed.value)


def stand_in_stack():
    """infra/local/stack.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stand_in_stack", INFRA / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stand_in_node_sees_only_the_python_environment_and_leaves_no_shared_folder(tmp_path):
    """A stand-in node's mount namespace hides the repository and /tmp and keeps the Python
    environment, through a folder under /run (shared by every namespace) that the node removes
    itself once started. A folder left for a stack's `stop` to sweep was swept by another stack
    stopping meanwhile (the suite runs stacks side by side), and a node then failed to start."""
    import re
    import subprocess
    import sys

    probe = "import json, os, pathlib, sys; print(json.dumps([os.listdir('/tmp'), pathlib.Path(sys.argv[1]).exists()]))"
    command = stand_in_stack().hidden_from_the_driver([sys.executable, "-c", probe, str(ROOT / "pipeline")])
    folders = re.findall(r"mount --bind '[^']+' '(/run/[^']+)'", command[-1])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    in_tmp, repository_seen = json.loads(done.stdout)
    venv = Path(sys.prefix)
    # /tmp is empty but for the way to the Python environment, where that is under /tmp (a checkout there)
    assert in_tmp == ([venv.relative_to("/tmp").parts[0]] if Path("/tmp") in venv.parents else []), in_tmp
    assert not repository_seen
    assert not [folder for folder in folders if Path(folder).exists()], folders
