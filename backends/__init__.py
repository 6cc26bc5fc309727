"""Datapath backends: one sub-package per proxy mode, behind one Backend protocol."""
