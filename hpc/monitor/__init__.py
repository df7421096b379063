"""Operator tools: `hpc status`, `hpc report`, `hpc doctor` and the run-data readers behind them.

They read what jobs wrote (run directories, heartbeats from ``hpc.instrument``, inference output
manifests) and never take part in a job.
"""
