"""Launching on Slurm (docs/slurm.md): submitit submission (``submit``), sbatch rendering
(``sbatch``, pure), requeue after preemption (``requeue``), job helpers (``jobs``), scheduled
scoring through scrontab (``schedule``), sweeps (``sweep``), the in-job entry points (``tasks``)
and thin wrappers over the Slurm commands (``slurm``)."""
