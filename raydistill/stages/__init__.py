"""Stages: capture, select, train, evaluate. Each is a driver, its workers and its own math; stages never import each other."""
