"""Recipes: orchestration over stages (the sweep, the demo, the demo's pretraining)."""
