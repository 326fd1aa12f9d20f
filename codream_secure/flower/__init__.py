"""CoDream on Flower: a ServerApp, a ClientApp, the link between them and a local deployment.

Importing this package imports no flwr (the core runs without it); the app modules do (the
`flower` extra).
"""
