"""Async jobs: Submit returns an id at once; GetResult long-polls for the outcome."""
