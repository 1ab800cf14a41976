"""Typed, validated configs: the base loader (``base``), the sections stages share (``sections``), one job
config per command (``jobs``). Everything is re-exported here, so ``from raydistill.config import X`` works."""

from raydistill.config.base import *  # noqa: F403
from raydistill.config.base import __all__ as _base
from raydistill.config.jobs import *  # noqa: F403
from raydistill.config.jobs import __all__ as _jobs
from raydistill.config.sections import *  # noqa: F403
from raydistill.config.sections import __all__ as _sections
from raydistill.errors import ConfigError

__all__ = ["ConfigError", *_base, *_jobs, *_sections]
