"""The simulator: one training iteration as a timeline of compute and communication events."""
