"""Webhooks: a job's final state POSTed to the URL its Submit named, signed per the Standard
Webhooks spec, delivered at least once.

policy.py decides where the server may send (--webhook-allow), signing.py signs (per-tenant
secrets from --webhook-secrets), sender.py attempts deliveries the job store says are due and
records each outcome there, so a delivery belongs to the store and outlives the process that
began it.
"""

from tensorgate.server.jobs.webhooks.sender import Webhooks

__all__ = ["Webhooks"]
