"""Reusable test harness: a fake Kubernetes API server, mini-cluster and traffic helpers.

It lives inside the package (not under tests/) because the unit tests, the e2e suite, the
demo and the benchmarks all drive the same harness.
"""
