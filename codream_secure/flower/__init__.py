"""CoDream on Flower. Importing this package imports no flwr: the core runs without it."""
