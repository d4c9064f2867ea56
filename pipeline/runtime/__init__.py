"""What the stages of pipeline/ share: the Ray session and its pre-flight, run identity, tracking,
the one training run that train, tune and ablation call, evaluation on Ray, the registry and serving.

No module here is a stage, and no stage imports another stage: a stage reads its config, calls
components/ and these helpers, and writes its declared outputs.
"""
