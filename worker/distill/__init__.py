"""The PyTorch core of distill: loaders, soft labels, losses, training, evaluation, export.
No web, DB or Celery."""
