"""spkid-search: hyperparameter search, training and voting ensembles for speaker identification."""

__version__ = "0.1.0"
