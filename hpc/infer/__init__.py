"""Batch inference (`hpc infer`): ``job.run(InferConfig)``; see docs/infer.md."""
