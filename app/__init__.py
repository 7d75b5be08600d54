"""The web service: an API process (FastAPI, no torch) and worker processes (one model each)."""
