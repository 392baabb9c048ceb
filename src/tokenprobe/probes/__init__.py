"""Probes: the Probe protocol, typed metadata and the file format (`base`), and the probe families."""
