"""Code every MECBench service shares: errors, logging, settings, server bootstrap."""
