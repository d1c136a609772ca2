"""The job's stages and their Ray Data wiring (job.py); the only package that runs Ray Data."""
