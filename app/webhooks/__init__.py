"""Webhooks: every status change of a job that has a `webhook_url` is POSTed there, signed per tenant."""
