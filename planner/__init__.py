"""Parallelism planner: cost model, search and simulator for transformer training.

Pure Python + numpy/networkx/pandas; importing it never imports torch or streamlit."""

__version__ = "0.1.0"
