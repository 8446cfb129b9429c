"""Schedules: which branch computes at which denoising step."""
