"""The pipeline's stages, one module each (``ltta.stages.<name>.run(params, paths)``).

:data:`ORDER` is the one list of them in an order that respects their dependencies (the DVC graph
in ``dvc.yaml``): the Prefect flow runs it and the tests run the stages in it.
"""

ORDER: tuple[str, ...] = (
    "prepare_data",
    "train_target",
    "build_loss_dataset",
    "train_predictor",
    "search_policy",
    "search_gps",
    "fit_aggregation",
    "evaluate",
)
