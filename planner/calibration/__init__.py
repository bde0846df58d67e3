"""Measurements against predictions: predicted vs measured, profile fitting and calibration."""
