"""The search behind `planner suggest`: the layout space, its scoring, the ranking and the
words that explain it."""
