"""The GPU benchmark runs where only torch and pydantic are installed (GPU machines here have no
Ray, MLflow, DVC, PyYAML or safetensors), and the benchmark summary reads its inputs right."""

import subprocess
import sys

from tests.dvc_helpers import ROOT

BLOCK_ALL_BUT_TORCH_AND_PYDANTIC = """
import sys
class Block:
    def find_spec(self, name, *args):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('not installed on a GPU machine: ' + name)
sys.meta_path.insert(0, Block())
import benchmarks.gpu
print('ok')
"""


def test_gpu_benchmark_needs_only_torch_pydantic_and_components():
    blocked = ["yaml", "safetensors", "albumentations", "cv2", "PIL", "ray", "mlflow", "dvc", "boto3", "pandas"]
    done = subprocess.run([sys.executable, "-c", BLOCK_ALL_BUT_TORCH_AND_PYDANTIC.format(blocked=blocked)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
