"""Celery side of distill: tasks that turn a job id into calls on the PyTorch core in `worker.distill`."""
