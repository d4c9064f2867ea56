"""The check that a stage's output holds no traceback of its own, on outputs seen in real runs."""

from tests.output_checks import project_tracebacks

SITE = "/venv/lib/python3.11/site-packages"
COORDINATOR = f"{SITE}/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py"
CONTROLLER = "\x1b[36m(TrainController pid=2763)\x1b[0m"
# What a training controller printed on a busy CI machine while the stage itself went on and
# ended with its own one-line error: Ray retried its autoscaler request after logging this.
RAY_RETRY = f"""{CONTROLLER} Traceback (most recent call last):
{CONTROLLER}   File "{COORDINATOR}", line 58, in send_resource_request
{CONTROLLER}     ray.get(
{CONTROLLER}   File "python/ray/_raylet.pyx", line 3471, in ray._raylet.CoreWorker.get_objects
{CONTROLLER} ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.
{CONTROLLER} [State Transition] INITIALIZING -> SCHEDULING.
error: [Errno 28] No space left on device while writing train.output = /disk/model
"""
OURS = """Traceback (most recent call last):
  File "/repo/pipeline/train.py", line 20, in main
    run_training(cfg)
  File "/repo/pipeline/runtime/training_run.py", line 41, in run_training
    raise ValueError("bad")
ValueError: bad
"""
# The project's code calling into Ray and failing there: one frame of ours is enough.
THROUGH_RAY = f"""\x1b[36m(RayTrainWorker pid=11)\x1b[0m Traceback (most recent call last):
\x1b[36m(RayTrainWorker pid=11)\x1b[0m   File "/repo/pipeline/runtime/trainer.py", line 90, in train_loop
\x1b[36m(RayTrainWorker pid=11)\x1b[0m   File "{SITE}/ray/train/_internal/session.py", line 12, in report
\x1b[36m(RayTrainWorker pid=11)\x1b[0m RuntimeError: lost
"""


def test_a_traceback_ray_logs_and_retries_past_is_not_the_stages():
    assert project_tracebacks(RAY_RETRY) == []


def test_a_traceback_of_the_project_counts_alone_or_through_ray():
    assert len(project_tracebacks(OURS)) == 1 and "ValueError: bad" in project_tracebacks(OURS)[0]
    assert len(project_tracebacks(RAY_RETRY + THROUGH_RAY + OURS)) == 2
    assert "trainer.py" in project_tracebacks(THROUGH_RAY)[0]
