"""The job kinds: thin Celery tasks over plain service functions."""
