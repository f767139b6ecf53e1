"""Shared fixtures: the local cluster (session) and a namespace per test."""

pytest_plugins = ["localcluster.pytest_plugin"]
