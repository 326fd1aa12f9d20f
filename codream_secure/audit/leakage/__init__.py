"""Leakage benchmark: what an attacker learns from CoDream's releases, measured.

Sections: dreams vs private data, server reconstruction, membership inference, the server's
view under secure aggregation. `codream_secure.audit.leakage.run.run_leakage` composes them.
"""
