# The few targets people need. `make run` and `make test` set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: setup system peer run samples test test-unit test-integration lint format train artifacts bench \
	images compose-up compose-down test-deploy deploy-report

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)   # first, so no CUDA build of torch is pulled
	$(PY) -m pip install -q -e ".[dev]"
	# quanto compiles its native kernels at first use (~25 s): now, not in a worker or a test
	$(PY) -c "from quantization.backends.quanto import build_extensions; build_extensions()"
	touch $@

setup: $(VENV)/.installed system

# Debian packages: redis-server (the service and its tests), prometheus (promtool and the
# server the monitoring tests run), chromium (the playground's browser test). Installed when
# missing and we are root.
SYSTEM_PACKAGES := redis-server prometheus chromium
system:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
		else echo "install them: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; }

# OpenVINO + NNCF, the peer bench.full_size compares against, in a venv of its own
# (same torch and diffusers, so it builds the same random-weight models)
PEER_VENV := .venv-peer
peer: $(PEER_VENV)/.installed
$(PEER_VENV)/.installed: pyproject.toml
	python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEER_VENV)/bin/python -m pip install -q $(TORCH)
	$(PEER_VENV)/bin/python -m pip install -q -e ".[peer]"
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m app

samples: setup
	HF_HUB_OFFLINE=1 $(PY) -m models.sample

# Two tiers (markers set in tests/conftest.py): unit, under a minute with no Redis and no
# worker process; integration, a real redis-server, workers, chromium, Prometheus, slow models.
test: test-unit test-integration

test-unit: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not integration"

test-integration: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m integration

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

train: setup
	HF_HUB_OFFLINE=1 $(PY) -m models.train all

# The committed quantized artifacts of the embedded models (python -m quantization quantize).
# t2i-digits' w8a8 is w8a8-static-sqnr on the x86 backend (oneDNN int8 for its convolutions
# too, planned by measured latency): compiled, 4.5x faster per step than the quanto static
# int8 it replaces, at a higher PSNR (docs/quantization-results.md).
# t2i-digits' w4a8-sqnr gets 1.5x the base's bytes, not the recipe's 1.2x: at 1.2x its plan
# stopped 3.5 dB short of the 30 dB target, and its italic adapter's images lost 1.5 dB
# against fp32's with the same adapter (the adapted UNet carries weight error further;
# docs/lora.md, "Fidelity on the quantized variants"). Entries: model:variant:recipe[:flag=value].
ARTIFACTS := dit-digits:w8a8:w8a8 dit-digits:w4a8-sqnr:w4a8-sqnr \
	t2i-digits:w8a8:w8a8-static-sqnr t2i-digits:w4a8-sqnr:w4a8-sqnr:--budget-ratio=1.5
artifacts: setup
	for a in $(ARTIFACTS); do m=$${a%%:*}; rest=$${a#*:}; v=$${rest%%:*}; rest=$${rest#*:}; \
		r=$${rest%%:*}; flag=$${rest#"$$r"}; flag=$${flag#:}; \
		rm -rf models/quantized/$$m-$$v; \
		HF_HUB_OFFLINE=1 $(PY) -m quantization quantize models/$$m --recipe $$r $$flag --out models/quantized/$$m-$$v || exit 1; \
	done

# Benchmarks: commands that write results under bench/results/.
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench.calibration
	HF_HUB_OFFLINE=1 $(PY) -m bench.amplification
	HF_HUB_OFFLINE=1 $(PY) -m bench.full_size
	HF_HUB_OFFLINE=1 $(PY) -m bench.full_size --arch sd15-unet --variants fp w8a8-static@quanto w4a16-g128
	HF_HUB_OFFLINE=1 $(PY) -m bench.report
	HF_HUB_OFFLINE=1 $(PY) -m bench.service_overhead --runs 50
	HF_HUB_OFFLINE=1 $(PY) -m bench.load_test
	HF_HUB_OFFLINE=1 $(PY) -m bench.kill_drill
	HF_HUB_OFFLINE=1 $(PY) -m bench.cold_start
	HF_HUB_OFFLINE=1 $(PY) -m bench.cold_start --compile --only dit-digits/fp32 dit-digits/w8a8 t2i-digits/fp32
	HF_HUB_OFFLINE=1 $(PY) -m bench.dashboard --seconds 90

# docker compose (docker-compose.yml; deploy/README.md). `images` installs and starts a Docker
# engine where there is none (root, Debian), then builds what is missing: the public Redis,
# Prometheus and Python images where they can be pulled, else the same built from Debian's
# packages; the service image (its layer cache keeps an unchanged rebuild to seconds).
COMPOSE := docker compose --env-file build/compose.env

images:
	deploy/docker/prepare.sh

# Detached; returns once every variant has a live worker (the compiled one takes minutes).
compose-up: images
	@start=$$(date +%s); $(COMPOSE) up -d --no-build --remove-orphans \
		&& python3 deploy/docker/wait_live.py --start $$start

# Stops and removes the containers; the volumes (Redis's data, the compile cache) stay:
# `docker compose down -v` removes them too.
compose-down:
	@if [ -f build/compose.env ] && docker info >/dev/null 2>&1; then $(COMPOSE) down --remove-orphans; fi

# Against the running stack, through its ports on 127.0.0.1 only (tests/deploy/compose, which
# make test never collects); brings the stack up first if needed and down at the end.
test-deploy: setup compose-up
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/deploy/compose; status=$$?; $(MAKE) compose-down; exit $$status

# bench/results/deploy.json: the image sizes and build times, and the time to every variant
# live, of the last make images / compose-up (a command that writes results, not a test).
deploy-report:
	python3 deploy/docker/report.py
