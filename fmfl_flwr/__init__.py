"""fmfl-flwr: backdoors and defenses in federated learning with a foundation model."""

__version__ = "0.1.0"
