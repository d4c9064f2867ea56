"""The registry gate against a real `mlflow server`, idempotent registration, predict, and the
champion served over HTTP by a real `mlflow models serve` process."""

import base64
import hashlib
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from components.gate import decide
from components.models import build_model, save_model
from pipeline.runtime import tracking
from pipeline.runtime.ports import free_local_port
from tests.conftest import tiny_model_config
from tests.services import python_env
from tests.test_significance import uniform_image_matrices
from tests.train_helpers import write_params

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leaked_tracking_uri")]


CLASS_NAMES = [f"class {index}" for index in range(19)]


def write_evaluations(workdir: Path, miou: float, gflops: float, per_image: np.ndarray) -> None:
    """The gate's inputs as evaluate and eval-scales write them: scores, and per-image matrices."""
    (workdir / "eval").mkdir()
    (workdir / "eval" / "metrics.json").write_text(json.dumps({"0.5,1,2": {"miou": miou, "gflops": gflops}}))
    np.savez_compressed(workdir / "eval" / "image_matrices.npz", **{"0.5,1,2": per_image})
    (workdir / "eval_scales").mkdir()
    archive = workdir / "eval_scales" / "image_matrices.npz"
    np.savez_compressed(archive, s05_10=per_image)
    (workdir / "eval_scales" / "recommended.yaml").write_text(json.dumps(
        {"recommended": {"name": "s05_10", "scales": [0.5, 1.0], "miou": miou, "gflops": gflops},
         "per_image": {"file": str(archive), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}}))


def trained_candidate(workdir, server, seed: int, miou: float, gflops: float = 5.0, dataset: str = "",
                      per_image: np.ndarray | None = None, **register_settings):
    """A model logged to MLflow as training does, an evaluation file and an inference-scale
    recommendation of [0.5, 1.0] with the given scores (the gate's inputs; the scores are chosen so
    the test knows which candidate is better). Unless given, every val image scores `miou`: no
    noise, so the gate follows the scores."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, workdir / "model",
               metadata={"classes": {"names": CLASS_NAMES, "colors": [[seed, 0, 0]] * 19}})
    mlflow.set_tracking_uri(server.uri)
    experiment = mlflow.get_experiment_by_name("hmsa") or mlflow.get_experiment(mlflow.create_experiment("hmsa"))
    with mlflow.start_run(experiment_id=experiment.experiment_id, tags={"dataset_manifest": dataset}) as run:
        model_uri = tracking.log_saved_model(workdir / "model", [0.5, 1.0])
    (workdir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "model_uri": model_uri,
                                                  "tracking_uri": server.uri}))
    write_evaluations(workdir, miou, gflops, uniform_image_matrices([miou] * 6) if per_image is None else per_image)
    return write_params(workdir, workdir, model=cfg.model_dump(mode="json"),
                        train={"output": str(workdir / "model"), "run_record": str(workdir / "run.json")},
                        evaluate={"output_dir": str(workdir / "eval")},
                        register={"output": str(workdir / "registration.json"), "min_delta": 0.01,
                                  **register_settings})


def register(params, server):
    done = subprocess.run([sys.executable, "-m", "pipeline.register", "--params", str(params)],
                          capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
    assert done.returncode == 0, done.stderr[-3000:]
    # a run logging its served model beside the trained one (another default set) warned that MLflow
    # could not change the run's param default_scales
    assert "Failed to log model config" not in done.stderr, done.stderr[-3000:]
    return json.loads((params.parent / "registration.json").read_text())


def test_gate_idempotence_and_predict(tmp_path, server):
    first = trained_candidate(tmp_path / "a", server, seed=1, miou=0.30)
    decision = register(first, server)
    assert decision["promoted"] and decision["reason"] == "no champion yet" and decision["version"] == "1"

    again = register(first, server)  # the same weights: no second version
    assert not again["created_version"] and again["version"] == "1" and again["aliases"]["champion"] == "1"

    worse = register(trained_candidate(tmp_path / "b", server, seed=2, miou=0.305), server)  # not by more than 0.01
    assert not worse["promoted"] and worse["aliases"] == {"champion": "1", "challenger": "2"}
    assert "not above min_delta = 0.01" in worse["reason"]

    better = register(trained_candidate(tmp_path / "c", server, seed=3, miou=0.40), server)
    # v2 lost to v1, which v3 replaced: no challenger is left standing against v3
    assert better["promoted"] and better["aliases"] == {"champion": "3", "previous": "1"}
    # judged on both versions' per-image matrices (v1's from its training run's artifacts), with
    # the interval reported
    assert better["noise_bound"]["images"] == 6 and better["noise_bound"]["ci95"][0] == pytest.approx(0.1, abs=1e-3)
    assert "95% interval [+0.1000, +0.1000] over 6 val images" in better["reason"]
    client = mlflow.MlflowClient(server.uri)
    assert len(client.search_model_versions("name = 'hmsa'")) == 3
    version = client.get_model_version("hmsa", "3")
    assert version.tags["val_miou"] == "0.4" and version.tags["method"] == "hierarchical"
    for number in ("1", "2", "3"):  # each version's own model carries its own figures
        registered = client.get_model_version("hmsa", number)
        figures = {m.key: m.value for m in client.get_logged_model(registered.source.removeprefix("models:/")).metrics}
        assert figures == {"val_miou_0.5_1": float(registered.tags["val_miou"]),
                           "gflops_0.5_1": float(registered.tags["gflops"])}, (number, figures)
    # the served set is the inference-scale search's recommendation, and callers get it by default
    assert version.tags["eval_scales"] == "[0.5, 1.0]" and better["served_scales"] == [0.5, 1.0]
    served = mlflow.pyfunc.load_model("models:/hmsa@champion")
    assert served.metadata.get_params_schema().params[0].default == [0.5, 1.0]
    assert served.unwrap_python_model().scales == [0.5, 1.0]
    # What a caller needs without our code: the class of each label, what the output is, and a
    # request that works (MLflow predicted on it when it logged the model).
    assert served.metadata.metadata["class_names"] == CLASS_NAMES
    assert served.metadata.metadata["method"] == "hierarchical"
    assert served.metadata.get_output_schema().inputs[0].name == "labels"
    (labels,) = served.predict(served.input_example)
    assert labels.shape == (64, 64) and labels.dtype == np.uint8 and int(labels.max()) < 19

    # an explicit evaluated set instead: the same weights serving another set are another version
    explicit = register(trained_candidate(tmp_path / "d", server, seed=3, miou=0.40, scale_set=[0.5, 1.0, 2.0]),
                        server)
    assert explicit["created_version"] and explicit["served_scales"] == [0.5, 1.0, 2.0]
    served = mlflow.pyfunc.load_model(f"models:/hmsa/{explicit['version']}")
    assert served.unwrap_python_model().scales == [0.5, 1.0, 2.0]  # the training run's model defaults to [0.5, 1.0]
    assert explicit["gate_source"].endswith("metrics.json")

    # predict through the registry alias, at a scale set the model never trained on
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            images / f"street{i}.png")
    (images / "broken.png").write_bytes(b"no image here")
    command = [sys.executable, "-m", "pipeline.predict", str(images / "street0.png"), str(images / "street1.png"),
               "--model", "models:/hmsa@champion", "--params", str(tmp_path / "c" / "params.yaml"),
               "--output", str(tmp_path / "out"), "--scales", "0.5", "1", "1.5"]
    done = subprocess.run(command, capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
    assert done.returncode == 0, done.stderr[-3000:]
    label = np.array(Image.open(tmp_path / "out" / "street0_label.png"))
    assert label.shape == (40, 56) and label.max() < 19
    assert (tmp_path / "out" / "street1_overlay.png").is_file()

    bad_cases = [
        (["models:/hmsa@nonexistent"], "hmsa@nonexistent"),
        ([str(tmp_path / "missing-model")], "no such saved-model directory"),
        (["models:/hmsa@champion", "--scales", "0.5", "2"], "needs 1.0"),
    ]
    for extra, message in bad_cases:
        argv = [sys.executable, "-m", "pipeline.predict", str(images / "street0.png"), "--params",
                str(tmp_path / "c" / "params.yaml"), "--output", str(tmp_path / "bad"), "--model", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
        assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    argv = [sys.executable, "-m", "pipeline.predict", "--params", str(tmp_path / "c" / "params.yaml"),
            "--model", str(tmp_path / "c" / "model"), "--output", str(tmp_path / "bad"), str(images / "broken.png")]
    done = subprocess.run(argv, capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
    assert done.returncode == 1 and "broken.png: unreadable image" in done.stderr


def test_a_candidate_of_another_dataset_or_tracking_store_is_refused_and_nothing_registered(tmp_path, server):
    """The gate compares versions of one dataset only (a synthetic-data champion judged a real-data
    candidate), and a training run recorded in another tracking store (after a move to a team
    server) is named with what to do, not `Run with id=... not found`."""
    name = {"model_name": "hmsa-datasets"}
    assert register(trained_candidate(tmp_path / "a", server, seed=1, miou=0.3, dataset="a" * 64, **name),
                    server)["promoted"]
    client = mlflow.MlflowClient(server.uri)
    other = trained_candidate(tmp_path / "b", server, seed=2, miou=0.9, dataset="b" * 64, **name)
    done = subprocess.run([sys.executable, "-m", "pipeline.register", "--params", str(other)],
                          capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
    assert done.returncode == 1 and "trained on dataset aaaaaaaaaaaa, this candidate on bbbbbbbbbbbb" in done.stderr
    assert [v.version for v in client.search_model_versions("name = 'hmsa-datasets'")] == ["1"]

    moved = trained_candidate(tmp_path / "c", server, seed=3, miou=0.9, dataset="a" * 64, **name)
    record = json.loads((tmp_path / "c" / "run.json").read_text())
    (tmp_path / "c" / "run.json").write_text(json.dumps({**record, "tracking_uri": "http://old-server:5000"}))
    done = subprocess.run([sys.executable, "-m", "pipeline.register", "--params", str(moved)],
                          capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
    assert done.returncode == 1 and "was tracked at http://old-server:5000" in done.stderr, done.stderr[-2000:]
    assert "dvc repro --force train" in done.stderr
    assert [v.version for v in client.search_model_versions("name = 'hmsa-datasets'")] == ["1"]


def test_decide_respects_the_cost_budget():
    candidate = {"version": "2", "miou": 0.9, "gflops": 50.0}
    champion = {"version": "1", "miou": 0.5, "gflops": 10.0}
    refusal = "50.00 GFLOPs exceeds register.max_gflops = 20.0"
    assert decide(candidate, champion, 0.0, max_gflops=20.0) == (False, refusal)
    assert decide(candidate, champion, 0.0, None)[0] is True
    assert decide(candidate, None, 0.0, None) == (True, "no champion yet")


def test_register_refuses_a_missing_recommendation_or_another_runs_evidence(tmp_path, server):
    """No recommendation, or per-image matrices that are not the ones the recommendation was written
    with (eval-scales killed between its two writes): one line naming the file, nothing registered."""
    params = trained_candidate(tmp_path / "a", server, seed=4, miou=0.3)
    versions = len(mlflow.MlflowClient(server.uri).search_model_versions("name = 'hmsa'"))
    choice = tmp_path / "a" / "eval_scales" / "recommended.yaml"
    written = choice.read_text()
    archive = tmp_path / "a" / "eval_scales" / "image_matrices.npz"
    for tampered, message in ((lambda: choice.write_text(json.dumps({"recommended": None})),
                               "recommended.yaml: no recommended scale set"),
                              (lambda: choice.write_text(json.dumps({**json.loads(written), "per_image": None})),
                               f"{choice} names no per-image evaluation (written by an older eval-scales)"),
                              (lambda: choice.write_text(json.dumps({**json.loads(written), "per_image": {
                                  **json.loads(written)["per_image"], "file": "elsewhere.npz"}})),
                               "written with the per-image evaluation elsewhere.npz, but eval_scales.image_matrices"),
                              (lambda: (choice.write_text(written),
                                        np.savez_compressed(archive, s05_10=uniform_image_matrices([0.9] * 6))),
                               f"{archive} is not the file {choice} was written with")):
        tampered()
        done = subprocess.run([sys.executable, "-m", "pipeline.register", "--params", str(params)],
                              capture_output=True, text=True, env=python_env(MLFLOW_TRACKING_URI=server.uri))
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert len(mlflow.MlflowClient(server.uri).search_model_versions("name = 'hmsa'")) == versions


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.timeout(600)
def test_champion_served_over_http_matches_predict(tmp_path, server):
    params = trained_candidate(tmp_path / "m", server, seed=5, miou=0.99)  # beats every earlier champion
    assert register(params, server)["aliases"]["champion"]
    image = np.random.default_rng(7).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "street.png")
    env = python_env(MLFLOW_TRACKING_URI=server.uri)
    predicted = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.predict",
            str(tmp_path / "street.png"),
            "--model",
            "models:/hmsa@champion",
            "--params",
            str(params),
            "--output",
            str(tmp_path / "out"),
            "--scales",
            "0.5",
            "1",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = np.array(Image.open(tmp_path / "out" / "street_label.png"))

    port = free_local_port()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the server execs uvicorn from PATH
    serve = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/hmsa@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                assert serve.poll() is None, serve.stdout.read()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
        request = {
            "dataframe_split": {"columns": ["image"], "data": [[_png_base64(image)]]},
            "params": {"scales": [0.5, 1.0, 2.0]},
        }
        status, body = _post(f"{url}/invocations", request)
        assert status == 200, body
        assert np.array_equal(np.array(body["predictions"][0], dtype=np.uint8), expected)

        status, body = _post(f"{url}/invocations", {**request, "params": {"scales": [0.5, 2.0]}})
        assert status == 400 and "needs 1.0" in body["message"], body
        status, body = _post(
            f"{url}/invocations",
            {
                **request,
                "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]},
            },
        )
        assert status == 400 and "row 0: unreadable image" in body["message"], body
        # a 48x64 image at scale 200 is 123 million pixels of work: refused from its header, in one line
        status, body = _post(f"{url}/invocations", {**request, "params": {"scales": [1.0, 200.0]}})
        assert status == 400 and "register.max_request_pixels" in body["message"], body
        assert "stack_trace" not in body and "Traceback" not in json.dumps(body), body
        status, body = _post(f"{url}/invocations", {"dataframe_split": request["dataframe_split"]})
        assert status == 200 and len(body["predictions"]) == 1  # the registered default scales
    finally:
        serve.terminate()
        serve.wait(timeout=30)
