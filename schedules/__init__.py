"""Schedules: which branch computes at which denoising step."""

from .schedule import FORMAT_NAME, FORMAT_VERSION, Schedule, as_schedule

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Schedule", "as_schedule"]
