"""Logit KD losses beyond KL and DKD (each one file, registered in :data:`gpd_ds.registry.KD_LOSSES`), and the
logit pre-process any of them can take (:mod:`gpd_ds.kd.standardize`)."""
