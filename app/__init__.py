"""The Streamlit planning UI: thin shells over the planner's library calls."""
