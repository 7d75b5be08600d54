# syntax=docker/dockerfile:1
# The service image: API and workers (the command chooses). CPU by default; for NVIDIA GPUs:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t t2i-service:cuda .
# (a CUDA build of torch brings its CUDA libraries; the host needs the NVIDIA container toolkit).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that matches the device, so no other build is pulled.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# The dependencies only (from pyproject.toml): this layer changes when they do, not with code.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin t2i
COPY --from=deps /opt/venv /opt/venv
WORKDIR /srv
# Models (the embedded ones and their quantized artifacts) before code: they change less often.
COPY --chown=t2i:t2i models/ /srv/models/
COPY --chown=t2i:t2i quality/ /srv/quality/
COPY --chown=t2i:t2i quantization/ /srv/quantization/
COPY --chown=t2i:t2i app/ /srv/app/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    T2I_REGISTRY=/srv/models/registry.toml
USER t2i
EXPOSE 8000 9101
# The API's liveness; worker containers override it (docker-compose.yml) with their metrics port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
