"""Cost of secure aggregation: the suite `codream-secure bench overhead` runs, and its parts.

`suite` (settings, sections, report), `scaling` (aggregator table, timed calls, power-law fits,
plots), `versus_flower` (one configuration against Flower's SecAgg+, and a CoDream session
step), `flower_secaggplus` (Flower 1.42's SecAgg+ workflow run in-process).
"""
