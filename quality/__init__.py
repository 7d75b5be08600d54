"""Quality evaluation shared by the quantization package and the service workers."""
