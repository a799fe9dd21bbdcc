"""dala-search: hyperparameter search for DALAResNet50 on BreakHis."""

__version__ = "0.1.0"
