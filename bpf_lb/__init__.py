"""eBPF C programs and the Python mirrors of their map layouts."""
