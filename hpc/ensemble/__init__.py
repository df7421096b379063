"""Ensembles: bagging (streaming Poisson bootstrap), boosting (SAMME, residuals), stacking (OOF folds).

The math lives in pure modules: ``boosting``, ``stacking`` here; the per-row bootstrap counts and
folds (``hpc.data.sampling``) and the row hook the trainer applies (``hpc.data.rowhooks``) in the
data layer; combining member outputs in ``hpc.models.combine``. ``spec.py`` validates
``ensemble.yaml``, ``driver.py`` trains members through ``hpc.train.run`` and registers them, and
``slurm_jobs.py`` runs the same members as Slurm jobs (``hpc ensemble submit``).
"""
