"""Celery tasks (`jobs.py`) and the steps they run in a child process (`steps.py`).

Kept import-free: the stage child imports `worker.tasks.steps` and must not pull in Celery or the database.
"""
