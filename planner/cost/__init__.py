"""The cost model: per-rank memory, FLOPs, collectives and step time of a plan (estimate.py
is the entry point; combine.py the one combination step estimate() and the search share)."""
