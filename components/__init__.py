"""Library code of the HMSA pipeline: importable with no side effects.

Nothing here imports ray, mlflow or boto3 at module top; the pipeline stages do.
"""
