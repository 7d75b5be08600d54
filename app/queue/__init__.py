"""The job queue on Redis Streams: key names, job records, the API side and the worker side."""
