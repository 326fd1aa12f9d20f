"""CoDream on Flower: a ServerApp, a ClientApp and the transport between them.

Importing this package does not import flwr; the app modules do (the `flower` extra).
"""
