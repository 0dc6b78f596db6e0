"""Ready-to-run training recipes, each runnable as ``python -m recipes.NAME`` (Hydra configs in ``conf/``)."""
