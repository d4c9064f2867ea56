"""DVC stages, one module each: load config -> build -> run -> write declared outputs.

Only here are ray, mlflow and boto3 imported. Run a stage with `python -m pipeline.<stage>`.
"""
