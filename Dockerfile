# The service image: API and workers (the command chooses). CPU by default; for NVIDIA GPUs:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t t2i-service:cuda .
# (a CUDA build of torch brings its CUDA libraries; the host needs the NVIDIA container toolkit).
#
# BASE_IMAGE: a Debian-based image with Python 3.11: python:3.11-slim, or where no image can be
# pulled the one `make compose-up` makes from Debian's packages (deploy/README.md).
# deploy/docker/pip/ may hold what pip uses in this build (README there): a torch wheel,
# installed instead of TORCH_INDEX's; ca.crt, pip's CA bundle; constraints.txt, the versions
# the tests ran with.
ARG BASE_IMAGE=python:3.11-slim

# g++ and Python's headers in both stages: quanto's kernels are compiled at build time, and
# torch.compile (`compile = true` in the registry) writes and compiles C++ at run time.
FROM ${BASE_IMAGE} AS system
# Marks every image of this build, so that `make images` can remove the ones a rebuild leaves
# untagged (each rebuild would otherwise leave ~5 GB behind).
LABEL io.t2i.image=service
RUN if python3 -c "import ensurepip, os, sysconfig; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" 2>/dev/null; \
    then extra=""; else extra="python3-dev python3-venv"; fi; \
    apt-get update && apt-get install -y --no-install-recommends g++ $extra \
    && rm -rf /var/lib/apt/lists/*

FROM system AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the wheel given or the index that matches the device, so no other build
# is pulled. (README.md always matches: the wheel and the CA bundle are optional.)
COPY deploy/docker/pip/README.md deploy/docker/pip/*.whl deploy/docker/pip/*.crt /tmp/pip/
RUN if [ -f /tmp/pip/ca.crt ]; then export PIP_CERT=/tmp/pip/ca.crt; fi; \
    wheel=$(ls /tmp/pip/torch-"${TORCH_VERSION}"+*.whl 2>/dev/null | head -n 1); \
    if [ -n "$wheel" ]; then pip install "$wheel"; \
    else pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; fi
# The dependencies only (from pyproject.toml): this layer changes when they do, not with code.
COPY pyproject.toml deploy/docker/pip/README.md deploy/docker/pip/constraints.tx[t] /tmp/pip/
RUN if [ -f /tmp/pip/ca.crt ]; then export PIP_CERT=/tmp/pip/ca.crt; fi; \
    if [ -f /tmp/pip/constraints.txt ]; then export PIP_CONSTRAINT=/tmp/pip/constraints.txt; fi; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pip/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# quanto compiles its native kernels into its package folder at first use: now, as root (at
# run time site-packages is root's and the job would wait ~25 s for g++).
COPY quantization/ /tmp/src/quantization/
RUN PYTHONPATH=/tmp/src python -c "from quantization.backends.quanto import build_extensions; print(build_extensions())" \
    && rm -rf /tmp/src /tmp/pip

FROM system AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin t2i \
    && mkdir -p /var/cache/t2i/compile && chown -R t2i:t2i /var/cache/t2i
COPY --from=deps /opt/venv /opt/venv
# Loading quanto's kernels takes a lock file in their build folder and lets ninja check that
# they are up to date: that one folder is the user's, the rest of the venv stays root's.
RUN chown -R t2i:t2i /opt/venv/lib/python3*/site-packages/optimum/quanto/library/extensions/cpp/build
WORKDIR /srv
# Models (the embedded ones and their quantized artifacts) before code: they change less often.
COPY --chown=t2i:t2i models/ /srv/models/
COPY --chown=t2i:t2i quality/ /srv/quality/
COPY --chown=t2i:t2i pipelines/ /srv/pipelines/
COPY --chown=t2i:t2i quantization/ /srv/quantization/
COPY --chown=t2i:t2i app/ /srv/app/
# T2I_COMPILE_CACHE_DIR: torch.compile's code, kept on a volume (docker-compose.yml) so that a
# restarted worker loads it instead of compiling again.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    T2I_REGISTRY=/srv/models/registry.toml \
    T2I_COMPILE_CACHE_DIR=/var/cache/t2i/compile
USER t2i
EXPOSE 8000 9101
# The API's liveness; worker containers override it (docker-compose.yml) with their metrics port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
