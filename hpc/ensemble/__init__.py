"""Ensembles: bagging (streaming Poisson bootstrap), boosting (SAMME, residuals), stacking (OOF folds).

The math lives in pure modules (sampling, boosting, stacking, combine); spec.py validates
``ensemble.yaml`` and runner.py trains members through ``hpc.train.run`` and registers them.
"""
