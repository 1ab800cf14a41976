"""Typed, validated configs: the base loader, the sections stages share, one job config per command."""

from raydistill.config.jobs import *  # noqa: F403
