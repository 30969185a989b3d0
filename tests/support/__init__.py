"""Helpers shared by the test tiers: polling with a deadline, real app processes."""
