"""``python -m raydistill`` (what `ray job submit ... -- python -m raydistill ...` runs)."""

from raydistill.cli import main

main()
